"""The roster: who is alive, as heard on the members exchange, and what this member announces.

Data flow: the session's listen queue delivers every member's heartbeat to ``on_heartbeat``,
which feeds the ``MemberTable`` and calls ``on_change`` (``Ownership.rebalance``) when the set of
live members changed; ``expire`` (every tick) forgets members gone silent. ``announce`` publishes
this member's own heartbeat: what it holds, whether the broker blocks it, how old its oldest
unacked delivery is. Two live members with one id (a second pool with the same ``--node-id``,
on another host or with another ``--state-dir``) would share partitions unpredictably: the one
whose pool started later (``Heartbeat.since``) hears of it here and ``on_duplicate`` stops it,
once it has heard the other twice (a single stale heartbeat proves nothing). ``idle`` names the
members that were assigned partitions but have announced holding none for ``grace_s`` (a
forged heartbeat, or a member that can't consume): the assignment leaves them out, each
logged once.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable

from .. import membership
from ..layout import KIND as LAYOUT_NOTICE
from ..membership import MemberTable
from ..settings import PoolSettings
from ..topology import members_exchange

log = logging.getLogger("ctlpool.worker")

SETTLE_INTERVALS = 2  # heartbeat intervals a new member listens before taking partitions (pool.worker.lifecycle)
DUPLICATE_LOG_S = 60.0  # another process announcing our member id is logged this often
DUPLICATE_HEARD = 2  # heartbeats from another process with our id before the later pool stops (not a stale one)


class Roster:
    def __init__(self, *, settings: PoolSettings, member_id: str, worker: int, started: float, since: float,
                 controllers: tuple[str, ...], clock: Callable[[], float], on_change: Callable[[], None],
                 on_duplicate: Callable[[str], None], on_layout: Callable[[bytes], None] = lambda body: None) -> None:
        self._settings = settings
        self.member_id = member_id
        self._worker = worker
        self._started = started
        self._since = since
        self._controllers = controllers
        self._clock = clock
        self._on_change = on_change
        self._on_duplicate = on_duplicate
        self.on_layout = on_layout  # a layout notice (``pool.layout``) heard on the members exchange
        self.members = MemberTable(settings.worker.member_timeout_s, clock)
        # a real member has heartbeats through its settle period and its acquisitions, and a tick to tell
        self.grace_s = settings.worker.member_timeout_s + (SETTLE_INTERVALS + 2) * settings.worker.heartbeat_interval_s
        # (member, incarnation) -> since when it has announced holding nothing (absent: it holds some)
        self._empty_since: dict[tuple[str, float], float] = {}
        self._idle_logged: set[tuple[str, float]] = set()
        self._duplicates: dict[tuple[str, int], int] = {}  # (node, pid) announcing our id -> heartbeats heard
        self._duplicate_logged = -1e9

    def reset(self) -> None:
        """A new session: nobody heard yet."""
        self.members = MemberTable(self._settings.worker.member_timeout_s, self._clock)
        self._empty_since.clear()

    def live(self) -> list[membership.Heartbeat]:
        return self.members.live()

    def holds(self, member_id: str, controller: str, index: int) -> bool:
        """Whether ``member_id`` last announced it has subscribed to that partition."""
        hb = self.members.get(member_id)
        return hb is not None and index in hb.parts.get(controller, {})

    def idle(self, controller: str, owners: list[str | None], *, exclude: str, not_before: float = 0.0) -> set[str]:
        """Members assigned some of ``controller``'s partitions (``owners``) that have announced
        holding none, in every heartbeat heard for ``grace_s`` (a reconnecting or restarted member
        gets the grace period afresh, as everyone does when the controller resumes from a pause at
        ``not_before``; see the module docstring)."""
        now = self._clock()
        out = set()
        for member_id in set(owners) - {exclude, None}:
            hb = self.members.get(member_id)  # type: ignore[arg-type]
            if hb is None or hb.parts.get(controller):
                continue
            first = max(self._empty_since.get((hb.id, hb.started), now), not_before)
            if now - first < self.grace_s:
                continue
            out.add(hb.id)
            if (hb.id, hb.started) not in self._idle_logged:
                self._idle_logged.add((hb.id, hb.started))
                log.warning("member %s (pid %d on %s) has announced itself for %.0fs but holds none of the %d "
                            "partitions of %s it was given; leaving it out (a forged heartbeat on the members "
                            "exchange, or a member that cannot consume)", hb.id, hb.pid, hb.node,
                            now - first, owners.count(hb.id), controller,
                            extra={"worker": self._worker, "controller": controller})
        return out

    def on_heartbeat(self, _ch: Any, _method: Any, props: Any, body: bytes) -> None:
        if getattr(props, "type", None) == LAYOUT_NOTICE:
            self.on_layout(body)
            return
        hb = membership.decode(body)
        if hb is None:
            return
        if hb.id == self.member_id and hb.pid != os.getpid():
            self._duplicate(hb)
            return
        incarnation = (hb.id, hb.started)  # a restarted member starts afresh
        if any(hb.parts.values()):
            self._empty_since.pop(incarnation, None)
        else:
            self._empty_since.setdefault(incarnation, self._clock())
        if self.members.observe(hb):
            self._on_change()

    def _duplicate(self, hb: membership.Heartbeat) -> None:
        """Another live process announces our member id (see the module docstring)."""
        other = (hb.node, hb.pid)
        heard = self._duplicates[other] = self._duplicates.get(other, 0) + 1
        earlier = (hb.since, hb.node, hb.pid) < (self._since, self._settings.node_id, os.getpid())
        if earlier and heard >= DUPLICATE_HEARD:
            self._on_duplicate(f"member id {hb.id} is already live: pid {hb.pid} on {hb.node}, in a pool started "
                               f"earlier; --node-id must be unique among the pools on one broker")
            return
        now = self._clock()
        if now - self._duplicate_logged >= DUPLICATE_LOG_S:
            self._duplicate_logged = now
            log.error("another process (pid %d on %s) announces member id %s too; --node-id must be unique "
                      "per host, or the two share partitions unpredictably", hb.pid, hb.node, hb.id,
                      extra={"worker": self._worker})

    def expire(self) -> None:
        """Every tick: forget members gone silent."""
        gone = self.members.expire()
        if gone:
            log.info("members gone (no heartbeat for %.0fs): %s", self._settings.worker.member_timeout_s,
                     ", ".join(gone), extra={"worker": self._worker})

    def announce(self, ch: Any, *, parts: dict[str, dict[int, int]], blocked: str | None, broker: str,
                 oldest_unacked_s: float, layouts: dict[str, int], paused: tuple[str, ...], bye: bool = False) -> None:
        """Publish our heartbeat on ``ch`` (not persistent, not confirmed: a lost one is just late)."""
        s = self._settings
        hb = membership.Heartbeat(id=self.member_id, node=s.node_id, worker=self._worker, weight=s.weight,
                                  started=self._started, controllers=self._controllers, bye=bye, parts=parts,
                                  pid=os.getpid(), blocked=blocked or "", broker=broker,
                                  oldest_unacked_s=round(oldest_unacked_s, 1), since=self._since,
                                  layouts=layouts, paused=paused)
        ch.raw.basic_publish(members_exchange(s.broker.prefix), "", membership.encode(hb))
