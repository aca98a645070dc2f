"""Self-fencing: a worker that may have lost its partitions takes no further reconcile step.

Data flow: the consume connection calls ``Lease.heard()`` before pika sees each socket read.
The broker talks to us at least every membership heartbeat interval (our own heartbeat comes
back on the members queue) and every half heartbeat timeout (AMQP heartbeats). It may close
our connection, and hand our partitions to a peer, once it has heard nothing from us for a
heartbeat timeout; we send at least every half timeout until we freeze. So while less than
half a timeout has passed since we last heard from it, it cannot have given our partitions
away (``Lease.valid``). After that, nothing that happened meanwhile can be trusted: a read
that arrives after the lease ran out does not renew it (it may be data queued before the
broker closed us), the lease is lost for the rest of the session, and ``on_lost`` tells the
worker, which cancels everything in flight and rejoins.

``fenced(coro, lease, on_slow)`` drives a reconcile coroutine step by step, checking the lease
before each step: once it is lost the coroutine gets ``CancelledError`` thrown in at its next
suspension point instead of the value it waited for. uvloop runs due timers before it reads
the socket that would report a dead connection, so after a freeze (SIGSTOP, a VM pause, a
blocking call on the loop) this check, which reads the clock, is what stops the step — not
the connection loss. What it cannot stop: the step already executing when the freeze came.

``on_slow(seconds)`` hears of each step that held the loop ``SLOW_STEP_S`` or more (the
blocked-loop watchdog: the worker names the controller and key). Cost: two clock reads and a
lease check per step (measured in ``bench/README.md``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Generator
from typing import Any, Callable

LEASE_FRACTION = 0.5  # of the negotiated heartbeat timeout; see the module docstring
SLOW_STEP_S = 1.0  # a step holding the loop this long starves every other key of the worker: say so


class Lease:
    """The worker's right to act on the partitions it holds in the current session."""

    __slots__ = ("clock", "valid_s", "until", "lost", "why", "on_lost")

    def __init__(self, clock: Callable[[], float], valid_s: float,
                 on_lost: Callable[[str], None] = lambda why: None) -> None:
        self.clock = clock
        self.valid_s = valid_s
        self.until = clock() + valid_s
        self.lost = False
        self.why = ""
        self.on_lost = on_lost

    def heard(self) -> None:
        """The broker just said something (called before the bytes are processed)."""
        if self.lost:
            return
        now = self.clock()
        if now > self.until:
            self._lose(now)
        else:
            self.until = now + self.valid_s

    def valid(self) -> bool:
        if self.lost:
            return False
        now = self.clock()
        if now > self.until:
            self._lose(now)
            return False
        return True

    def _lose(self, now: float) -> None:
        self.lost = True
        self.why = (f"nothing heard from the broker for {now - self.until + self.valid_s:.1f}s "
                    f"(lease {self.valid_s:.1f}s)")
        self.on_lost(self.why)


class Fenced(asyncio.CancelledError):
    """Thrown into a reconcile whose worker lost its lease (a subclass of ``CancelledError``)."""


class _Driver:
    __slots__ = ("_coro", "_lease", "_on_slow")

    def __init__(self, coro: Coroutine[Any, Any, Any], lease: Lease, on_slow: Callable[[float], None]) -> None:
        self._coro = coro
        self._lease = lease
        self._on_slow = on_slow

    def __await__(self) -> Generator[Any, Any, Any]:
        coro, lease, clock = self._coro, self._lease, self._lease.clock
        send: Any = None
        throw: BaseException | None = None
        while True:
            if throw is None and not lease.valid():
                throw = Fenced(lease.why)
            t0 = clock()
            try:
                yielded = coro.send(send) if throw is None else coro.throw(throw)
            except StopIteration as stop:  # PEP 479: it must not leave this generator as itself
                return stop.value
            finally:
                took = clock() - t0
                if took >= SLOW_STEP_S:
                    self._on_slow(took)
            send, throw = None, None
            try:
                send = yield yielded
            except BaseException as exc:  # noqa: BLE001 - cancellation and the like, for the coroutine
                throw = exc


def fenced(coro: Coroutine[Any, Any, Any], lease: Lease, on_slow: Callable[[float], None]) -> Any:
    """An awaitable running ``coro`` with the lease checked before every step."""
    return _Driver(coro, lease, on_slow)
