"""A reconcile step that blocks the event loop is stopped before the lease runs out, and blamed.

Why: ``time.sleep(30)`` (or any blocking client) in an ``async def`` reconcile holds the worker's
event loop. Past the lease (``pool.fence``) the worker must assume the broker gave its partitions
away, and fences itself: every reconcile in flight is cancelled, the event is redelivered to
another worker and blocks that one in turn, for ever (a redelivery says nothing about why).

Data flow: the step driver (``pool.fence``) writes when the step now running began into
``Steps.started``. A daemon thread (``Watchdog``) looks every ``TICK_S``: ``due`` (pure) says
to interrupt once a step, watched by ticks that were themselves on time (a SIGSTOP or a paused
VM freezes this thread too, and a freeze is not the step's fault), has run ``min_block_s`` and
would outlast the lease within ``margin_s``. The thread then sends ``SIGUSR1`` to the loop's
thread, whose handler raises ``LoopBlocked(seconds)`` right there if that very step still runs.
Python runs a signal handler in the main thread between bytecodes and after an interrupted
system call, so this stops ``time.sleep``, blocking socket calls and pure-Python loops; C code
that holds the GIL cannot be stopped (the lease runs out and the worker fences, as before).

The reconcile fails with ``LoopBlocked``; ``pool.outcome`` counts it toward ``--max-deliveries``
(carried with the event, like a death inside a reconcile), retries it through the delay tiers
and parks it as ``loop-blocked`` at the limit. The lease is kept: nothing else in flight is
cancelled and no partition changes hands.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from typing import Callable

from .errors import LoopBlocked
from .fence import SLOW_STEP_S, Lease, Steps

log = logging.getLogger("ctlpool.worker")

TICK_S = 0.1  # how often the thread looks: a few microseconds of GIL each time
LATE_S = 0.5  # a tick this late means the whole process was frozen (SIGSTOP, a paused VM): blame nothing
MARGIN_FRACTION = 0.25  # interrupt with this share of the lease still left: time to settle and read the socket
RESEND_S = 1.0  # a step that swallowed the interrupt (a bare except) gets another one this often
SIGNAL = signal.SIGUSR1  # unused by ctlpool otherwise; its default action (terminate) is replaced


def margin_s(lease_s: float) -> float:
    """How much of the lease must be left when a blocking step is interrupted."""
    return max(MARGIN_FRACTION * lease_s, 2 * TICK_S)


def min_block_s(lease_s: float) -> float:
    """A step must have blocked at least this long to be blamed (never a step that just began)."""
    return min(SLOW_STEP_S, lease_s / 2)


def due(now: float, watched_since: float, lease: Lease) -> bool:
    """Whether a step watched running since ``watched_since`` must be interrupted now."""
    if lease.lost or not math.isfinite(lease.valid_s):
        return False  # lost: the fence handles it; infinite: no broker deadline to protect
    return (now - watched_since >= min_block_s(lease.valid_s)
            and lease.until - now <= margin_s(lease.valid_s))


class Watchdog:
    """The watching thread and the signal handler (see the module docstring); ``tick`` is pure
    but for ``interrupt``, so tests drive it with a fake clock."""

    def __init__(self, steps: Steps, lease: Callable[[], Lease], *, clock: Callable[[], float],
                 interrupt: Callable[[], None] | None = None) -> None:
        self.steps = steps
        self.lease = lease
        self.clock = clock
        self.target = 0.0  # the step (its start) the handler may interrupt
        self._interrupt = interrupt or self._signal_loop
        self._loop_thread = threading.get_ident()
        self._last = clock()
        self._watched = 0.0
        self._since = 0.0
        self._sent = -math.inf
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def tick(self) -> bool:
        """One look; True when it interrupted the step now running."""
        now = self.clock()
        late = now - self._last > LATE_S
        self._last = now
        started = self.steps.started
        if not started:
            self._watched = 0.0
            return False
        if started != self._watched:  # a step not seen before: it began after the last tick
            self._watched = started
            self._since = now if late else started
        elif late:
            self._since = now  # frozen meanwhile: watch it afresh
        if not due(now, self._since, self.lease()) or now - self._sent < RESEND_S:
            return False
        self._sent = now
        self.target = started
        self._interrupt()
        return True

    def handle(self, _signum: int, _frame: object) -> None:
        """The signal handler, on the loop's thread: interrupt the step if it is still the one."""
        started = self.steps.started
        if started and started == self.target:
            self.target = 0.0
            raise LoopBlocked(self.clock() - started)

    def _signal_loop(self) -> None:
        signal.pthread_kill(self._loop_thread, SIGNAL)

    def start(self) -> None:
        """Install the handler (from the loop's thread, the process's main one) and start watching."""
        signal.signal(SIGNAL, self.handle)
        self._thread = threading.Thread(target=self._run, name="ctlpool-blocker", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(TICK_S):
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - the watchdog must outlive its own bugs
                log.exception("loop-blocker watchdog tick failed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(1.0)
        signal.signal(SIGNAL, signal.SIG_DFL)


def watch(steps: Steps, lease: Callable[[], Lease], clock: Callable[[], float] = time.monotonic) -> Watchdog | None:
    """Start a ``Watchdog`` when called from the main thread (signal handlers live there); else None.
    ``clock`` must be the one ``steps`` and the lease read."""
    if threading.current_thread() is not threading.main_thread():
        return None
    w = Watchdog(steps, lease, clock=clock)
    w.start()
    return w
