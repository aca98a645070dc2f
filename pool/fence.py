"""Self-fencing: a worker that may have lost its partitions takes no further reconcile step.

Data flow: the consume connection calls ``Lease.heard()`` before pika sees each socket read.
The broker talks to us at least every membership heartbeat interval (our own heartbeat comes
back on the members queue, and the session's probe is answered: ``pool.worker.session``) and
every half heartbeat timeout (AMQP heartbeats); the worker checks the lease every interval too,
so a node gone silent fences it even when no reconcile is running. It may close
our connection, and hand our partitions to a peer, once it has heard nothing from us for a
heartbeat timeout; we send at least every half timeout until we freeze. So while less than
half a timeout has passed since we last heard from it, it cannot have given our partitions
away (``Lease.valid``). After that, nothing that happened meanwhile can be trusted: a read
that arrives after the lease ran out does not renew it (it may be data queued before the
broker closed us), the lease is lost for the rest of the session, and ``on_lost`` tells the
worker, which cancels everything in flight and rejoins.

``first_step(coro, lease, steps, *args)`` runs a reconcile's first step in place (most
reconciles finish in it) and returns, if it waits, an awaitable for the rest that checks the
lease before each further step (``fenced`` does both); the lease is checked before the first
step too: once it is lost the coroutine gets ``CancelledError`` thrown in at its next
suspension point instead of the value it waited for. uvloop runs due timers before it reads
the socket that would report a dead connection, so after a freeze (SIGSTOP, a VM pause, a
blocking call on the loop) this check, which reads the clock, is what stops the step — not
the connection loss. What it cannot stop: the step already executing when the freeze came.

``Steps`` is what the driver tells the rest of the process: ``started`` is when the step now
running began (0.0 between steps), which ``pool.blocker``'s watchdog thread reads to interrupt
a step that would outlast the lease; ``on_slow(seconds, *args)`` hears of each step that held
the loop ``SLOW_STEP_S`` or more (the worker names the controller and key). Cost: two clock
reads, two stores and a lease check per step (measured in ``bench/README.md``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
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


class Steps:
    """The step now running (``started``, a clock reading; 0.0 between steps) and who hears of slow ones."""

    __slots__ = ("started", "on_slow")

    def __init__(self, on_slow: Callable[..., None] = lambda seconds, *args: None) -> None:
        self.started = 0.0
        self.on_slow = on_slow


class Fenced(asyncio.CancelledError):
    """Thrown into a reconcile whose worker lost its lease (a subclass of ``CancelledError``)."""


def first_step(coro: Coroutine[Any, Any, Any], lease: Lease, steps: Steps, *args: Any) -> tuple[bool, Any]:
    """Check the lease, then run ``coro``'s first step here: ``(True, result)`` when it finished
    in it (the common case costs no more than this call), ``(False, awaitable)`` when it waits:
    await that for the rest, each step checked (``rest``). Raises ``Fenced`` without starting it
    when the lease is lost, and whatever the step raised."""
    lease_clock = lease.clock
    t0 = lease_clock()
    if lease.lost or t0 > lease.until:
        lease.valid()  # records and reports the loss
        coro.close()
        raise Fenced(lease.why)
    steps.started = t0
    try:
        yielded = coro.send(None)
    except StopIteration as stop:
        return True, stop.value
    finally:
        steps.started = 0.0
        took = lease_clock() - t0
        if took >= SLOW_STEP_S:
            steps.on_slow(took, *args)
    return False, _Rest(coro, yielded, lease, steps, args)


class _Rest:
    """The rest of a coroutine whose first step ran in ``first_step``: hands the task what that
    step waits on, then checks the lease before every further step. Its own iterator, so a step
    costs a method call, not a generator frame (``eager._Resume`` is built the same way)."""

    __slots__ = ("_coro", "_pending", "_lease", "_steps", "_args", "_t0")

    def __init__(self, coro: Coroutine[Any, Any, Any], pending: Any, lease: Lease, steps: Steps,
                 args: tuple[Any, ...]) -> None:
        self._coro = coro
        self._pending: Any = pending
        self._lease = lease
        self._steps = steps
        self._args = args
        self._t0 = 0.0

    def __await__(self) -> "_Rest":
        return self

    def __iter__(self) -> "_Rest":
        return self

    def __next__(self) -> Any:
        return self.send(None)

    def _stepped(self) -> None:
        self._steps.started = 0.0
        took = self._lease.clock() - self._t0
        if took >= SLOW_STEP_S:
            self._steps.on_slow(took, *self._args)

    def send(self, value: Any) -> Any:
        pending = self._pending
        if pending is not None:  # the first step's outcome: what it waits on
            self._pending = None
            return pending
        lease = self._lease
        self._t0 = now = lease.clock()
        if lease.lost or now > lease.until:
            lease.valid()
            return self.throw(Fenced(lease.why))
        self._steps.started = now
        try:
            return self._coro.send(value)
        finally:
            self._stepped()

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        self._pending = None
        if not isinstance(typ, BaseException):
            typ = typ() if val is None else val
        self._t0 = self._steps.started = self._lease.clock()
        try:
            return self._coro.throw(typ)
        finally:
            self._stepped()

    def close(self) -> None:
        self._coro.close()


async def fenced(coro: Coroutine[Any, Any, Any], lease: Lease, steps: Steps, *args: Any) -> Any:
    """Await ``coro`` with the lease checked before every step; ``steps.on_slow(seconds, *args)``
    hears of a step that held the loop ``SLOW_STEP_S`` or more."""
    finished, value = first_step(coro, lease, steps, *args)
    return value if finished else await value
