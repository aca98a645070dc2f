"""Who is alive: heartbeats on the ``ctl.members`` fanout exchange, and the table every worker keeps.

Data flow: each worker publishes a ``Heartbeat`` every ``heartbeat_interval_s`` (and one with
``bye=True`` when it stops cleanly) to the fanout exchange; every worker (and ``ctlpool
status``) binds a private queue to it and feeds what arrives into a ``MemberTable``. A member
is live from its first heartbeat until a ``bye`` or until it has been silent for
``member_timeout_s``. ``live()`` is what ``pool.assignment`` turns into partition owners, so
every worker with the same table computes the same owners. Tables may disagree for a moment
(a heartbeat in flight); that only delays a handover — the broker's single-consumer lock,
not this table, is what keeps two workers off one partition.
"""

from __future__ import annotations

from typing import Callable

import msgspec


class Heartbeat(msgspec.Struct, frozen=True, omit_defaults=True):
    """One member's announcement. ``parts`` maps controller -> {partition: unacked deliveries}."""

    id: str
    node: str
    worker: int
    weight: float
    started: float
    controllers: tuple[str, ...]
    bye: bool = False
    parts: dict[str, dict[int, int]] = {}
    pid: int = 0
    blocked: str = ""
    """Why the broker blocks this member's publishing (a memory or disk alarm); empty when it doesn't."""
    broker: str = ""
    """The broker node this member consumes from (host:port), shown by ``ctlpool status``."""
    since: float = 0.0
    """When this member's pool (its supervisor) started, wall clock: of two live members with one
    id, the later one stops (``pool.worker.ownership``)."""
    layouts: dict[str, int] = {}
    """The layout version (``pool.layout``) this member consumes, per controller; absent in members
    of a ctlpool that knows no layouts, and a resize refuses while one is alive."""
    paused: tuple[str, ...] = ()
    """Controllers a resize paused that this member holds no partition of any more."""
    oldest_unacked_s: float = 0.0
    """How long its oldest delivery not yet acked has been held (a stalled worker shows here)."""


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Heartbeat)


def encode(hb: Heartbeat) -> bytes:
    return _encoder.encode(hb)


def decode(body: bytes) -> Heartbeat | None:
    """A heartbeat, or None for anything else on the exchange (never raises)."""
    try:
        return _decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


class MemberTable:
    """Live members as last heard from; the clock is injected (monotonic seconds)."""

    def __init__(self, timeout_s: float, clock: Callable[[], float]) -> None:
        self.timeout_s = timeout_s
        self.clock = clock
        self._members: dict[str, tuple[Heartbeat, float]] = {}
        self._gone: dict[str, float] = {}  # said bye at: ignore late heartbeats sent before it

    def observe(self, hb: Heartbeat) -> bool:
        """Record a heartbeat; True when the set of live members changed."""
        now = self.clock()
        if hb.bye:
            self._gone[hb.id] = hb.started
            return self._members.pop(hb.id, None) is not None
        if self._gone.get(hb.id) == hb.started:
            return False  # a heartbeat overtaken by the same incarnation's goodbye
        known = hb.id in self._members
        self._members[hb.id] = (hb, now)
        return not known

    def expire(self) -> list[str]:
        """Drop members silent for longer than the timeout; returns their ids."""
        now = self.clock()
        dead = [mid for mid, (_, seen) in self._members.items() if now - seen > self.timeout_s]
        for mid in dead:
            del self._members[mid]
        return dead

    def live(self) -> list[Heartbeat]:
        return [hb for hb, _ in sorted(self._members.values(), key=lambda e: e[0].id)]

    def get(self, member_id: str) -> Heartbeat | None:
        """The member's last heartbeat, if it is live."""
        entry = self._members.get(member_id)
        return entry[0] if entry else None

    def last_seen(self, member_id: str) -> float | None:
        entry = self._members.get(member_id)
        return entry[1] if entry else None

    def signature(self) -> tuple[tuple[str, float, tuple[str, ...]], ...]:
        """Changes exactly when the assignment inputs change."""
        return tuple((hb.id, hb.weight, hb.controllers) for hb in self.live())
