"""pool.worker.roster with a fake clock: who is left out of the assignment, who is a duplicate."""

from __future__ import annotations

import os

from pool import membership
from pool.settings import resolve
from pool.worker.roster import Roster


class Clock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


def roster(clock: Clock, duplicates: list[str] | None = None) -> Roster:
    settings = resolve({"node-id": "n1"}, env={})
    return Roster(settings=settings, member_id="n1/0", worker=0, started=1.0, since=100.0, controllers=("c",),
                  clock=clock, on_change=lambda: None, on_duplicate=(duplicates if duplicates is not None else []).append)


def hb(member: str, parts: dict[int, int] | None = None, **kw) -> bytes:
    return membership.encode(membership.Heartbeat(id=member, node=member.split("/")[0], worker=0, weight=1.0,
                                                  started=2.0, controllers=("c",), parts={"c": parts or {}}, **kw))


def test_a_member_holding_none_of_its_share_past_the_grace_period_is_left_out():
    clock = Clock()
    r = roster(clock)
    owners = ["n1/0", "ghost/0", "real/0", "ghost/0"]
    # Given a member that announces itself and holds nothing, and one that took its share
    r.on_heartbeat(None, None, None, hb("ghost/0"))
    r.on_heartbeat(None, None, None, hb("real/0", {2: 0}))
    # Then within the grace period nobody is left out (a newcomer needs a moment to subscribe)
    clock.now += r.grace_s - 0.1
    assert r.idle("c", owners, exclude="n1/0") == set()
    # and after it, only the member that never held any is
    clock.now += 0.2
    r.on_heartbeat(None, None, None, hb("ghost/0"))
    assert r.idle("c", owners, exclude="n1/0") == {"ghost/0"}
    # and it comes back the moment it announces a partition it holds
    r.on_heartbeat(None, None, None, hb("ghost/0", {1: 0}))
    assert r.idle("c", owners, exclude="n1/0") == set()
    assert r.holds("ghost/0", "c", 1) and not r.holds("ghost/0", "c", 3)


def test_of_two_live_members_with_one_id_the_later_pool_stops_after_two_heartbeats():
    clock = Clock()
    stopped: list[str] = []
    r = roster(clock, stopped)
    # a pool started later than ours (since 200 > 100) with our id: we stay, it is logged
    r.on_heartbeat(None, None, None, hb("n1/0", pid=os.getpid() + 1, since=200.0))
    r.on_heartbeat(None, None, None, hb("n1/0", pid=os.getpid() + 1, since=200.0))
    assert stopped == []
    # one started earlier: one heartbeat proves nothing (a stale one), the second stops us
    r.on_heartbeat(None, None, None, hb("n1/0", pid=os.getpid() + 2, since=50.0))
    assert stopped == []
    r.on_heartbeat(None, None, None, hb("n1/0", pid=os.getpid() + 2, since=50.0))
    assert len(stopped) == 1 and "already live" in stopped[0]


def test_a_member_that_reconnects_or_restarts_gets_the_grace_period_afresh():
    clock = Clock()
    r = roster(clock)
    owners = ["n1/0", "w/1"]
    r.on_heartbeat(None, None, None, hb("w/1", {1: 0}))
    # Given a member that held its partition for a long time, then lost its session
    clock.now += 100.0
    r.on_heartbeat(None, None, None, hb("w/1", {1: 0}))
    clock.now += 1.0
    r.on_heartbeat(None, None, None, hb("w/1"))  # reconnecting: holds nothing for a moment
    # Then it is not left out while it takes its partitions again
    clock.now += r.grace_s - 1.5
    assert r.idle("c", owners, exclude="n1/0") == set()
    # and a restarted process of that member (a new incarnation) is not either
    raw = membership.Heartbeat(id="w/1", node="w", worker=1, weight=1.0, started=3.0, controllers=("c",))
    clock.now += 5.0
    r.on_heartbeat(None, None, None, membership.encode(raw))
    assert r.idle("c", owners, exclude="n1/0") == set()
