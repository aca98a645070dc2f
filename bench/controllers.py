"""Controllers the bench runs inside real pool workers (``--controllers bench.controllers:Noop``).

Data flow: a publisher sends ``{"k": key index, "n": sequence within the key, "t":
monotonic ns at publish}`` with routing key ``k<index>``; the worker decodes it into
``Event`` (msgspec, like any typed controller) and hands the latest event of the key
to ``reconcile``, which records key, n, deliveries covered, start, end and t
(``bench.records``) and returns ``None`` (converged, ack).

``Sleepy`` holds each key for ``$BENCH_SLEEP_MS`` milliseconds (``asyncio.sleep``), the
shape of a controller that calls an API: what ``hotkeys`` needs to make coalescing show.
"""

from __future__ import annotations

import asyncio
import os
import time

import msgspec

from pool import Controller

from .records import Recorder

NAME = "bench"  # exchange <prefix>.bench, queues <prefix>.bench.p000 ...
_recorder = Recorder()
_clock = time.monotonic_ns


class Event(msgspec.Struct):
    k: int
    n: int
    t: int


class Noop(Controller):
    """Does nothing but record: the load target of saturate, drain, latency, sweep and scale."""

    name = NAME
    event_type = Event

    async def reconcile(self, key: str, event: Event, ctx: object) -> None:
        start = _clock()
        _recorder.add(event.k, event.n, ctx.coalesced + 1, start, _clock(), event.t)  # type: ignore[attr-defined]


class Sleepy(Controller):
    """Takes ``$BENCH_SLEEP_MS`` (default 2) per reconcile without using the CPU."""

    name = NAME
    event_type = Event
    sleep_s = 0.002

    def setup(self) -> None:
        self.sleep_s = float(os.environ.get("BENCH_SLEEP_MS", "2")) / 1000

    async def reconcile(self, key: str, event: Event, ctx: object) -> None:
        start = _clock()
        await asyncio.sleep(self.sleep_s)
        _recorder.add(event.k, event.n, ctx.coalesced + 1, start, _clock(), event.t)  # type: ignore[attr-defined]


def flush() -> None:
    """Write buffered records now (``bench.profile_worker`` runs a Worker in-process)."""
    _recorder.flush()
