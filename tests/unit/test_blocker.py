"""pool.blocker with a fake clock: which blocking step is interrupted, and when; and the real
signal path on this process's main thread."""

from __future__ import annotations

import threading
import time

import pytest

from pool import blocker
from pool.errors import LoopBlocked
from pool.fence import Lease, Steps


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def rig(lease_s: float = 2.5) -> tuple[Clock, Steps, Lease, blocker.Watchdog, list[float]]:
    clock, steps = Clock(), Steps()
    lease = Lease(clock, lease_s)
    fired: list[float] = []
    w = blocker.Watchdog(steps, lambda: lease, clock=clock, interrupt=lambda: fired.append(clock.now))
    return clock, steps, lease, w, fired


def advance(clock: Clock, w: blocker.Watchdog, seconds: float, step: float = blocker.TICK_S) -> None:
    """Tick the watchdog on time for ``seconds``."""
    end = clock.now + seconds
    while clock.now < end - 1e-9:
        clock.now += step
        w.tick()


def test_a_step_blocking_toward_the_end_of_the_lease_is_interrupted_in_time():
    # Given a 2.5 s lease last renewed 0.5 s before a step starts blocking
    clock, steps, lease, w, fired = rig()
    clock.now += 0.5
    steps.started = clock.now
    # When the watchdog ticks on time while the step blocks (the lease is not renewed)
    advance(clock, w, 2.0)
    # Then it interrupted the step once, with a margin of the lease left, and after min_block_s
    assert len(fired) == 1
    assert lease.until - fired[0] >= blocker.margin_s(2.5) - blocker.TICK_S
    assert fired[0] - steps.started >= blocker.min_block_s(2.5)
    assert w.target == steps.started


def test_short_steps_and_idle_loops_are_never_interrupted():
    clock, steps, lease, w, fired = rig()
    for _ in range(50):  # many 50 ms steps, the lease renewed between them
        steps.started = clock.now
        advance(clock, w, 0.05, step=0.05)
        steps.started = 0.0
        lease.heard()
        advance(clock, w, 0.1)
    advance(clock, w, 10.0)  # idle: nothing running, whatever the lease says
    assert fired == []


def test_a_frozen_process_is_not_the_steps_fault():
    # Given a step running when the whole process is stopped (SIGSTOP: this thread stops too)
    clock, steps, lease, w, fired = rig()
    steps.started = clock.now
    advance(clock, w, 0.3)
    clock.now += 25.0  # frozen: the next tick comes 25 s late
    w.tick()
    # Then nothing is blamed (the lease ran out: the worker fences, as it must)
    assert fired == [] and not blocker.due(clock.now, clock.now, lease)


def test_a_step_seen_only_after_a_freeze_is_watched_afresh():
    clock, steps, lease, w, fired = rig(lease_s=10.0)
    steps.started = clock.now
    clock.now += 5.0  # the process was stopped right after the step began
    w.tick()
    lease.until = clock.now + 10.0  # (the broker was heard as soon as it resumed)
    advance(clock, w, 8.0)
    # interrupted only after blocking on time long enough, measured from the freeze's end
    assert len(fired) == 1 and fired[0] - (steps.started + 5.0) >= blocker.min_block_s(10.0)


def test_a_lost_or_endless_lease_interrupts_nothing():
    clock, steps, lease, w, fired = rig()
    lease.valid_s = float("inf")
    lease.until = float("inf")
    steps.started = clock.now
    advance(clock, w, 30.0)
    assert fired == []


def test_the_handler_raises_only_into_the_step_it_was_aimed_at():
    clock, steps, _lease, w, _fired = rig()
    steps.started = 5.0
    w.target = 4.0  # a step that already ended
    w.handle(0, None)  # nothing raised
    w.target = 5.0
    clock.now = 7.5
    with pytest.raises(LoopBlocked) as info:
        w.handle(0, None)
    assert info.value.seconds == 2.5 and w.target == 0.0


def test_the_signal_interrupts_a_blocking_call_on_the_main_thread():
    # Given the real watchdog on this (main) thread, a 1 s lease, a step marked running
    assert threading.current_thread() is threading.main_thread()
    steps = Steps()
    lease = Lease(time.monotonic, 1.0)
    w = blocker.watch(steps, lambda: lease, time.monotonic)
    assert w is not None
    t0 = steps.started = time.monotonic()
    try:
        # When the step blocks in time.sleep for 10 s
        with pytest.raises(LoopBlocked):
            time.sleep(10)
    finally:
        steps.started = 0.0
        w.stop()
    # Then it was interrupted before the lease ran out
    assert time.monotonic() - t0 < 1.0
