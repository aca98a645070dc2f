"""pool.outcome: what becomes of a reconcile's deliveries, decided with no loop and no broker."""

import math

import pytest

from pool import codec
from pool.controller import Result
from pool.errors import Permanent
from pool.outcome import Ack, Delay, Park, decide
from pool.retries import RetryPolicy

POLICY = RetryPolicy(base_s=1.0, factor=2.0, max_delay_s=60.0, max_attempts=3, jitter=0.0)


def d(produced, attempt=0):
    return decide(produced, policy=POLICY, attempt=attempt, timeout_s=30.0, rand=lambda: 0.5)


def test_converged_and_requeued():
    assert d(None) == Ack()
    assert d(Result()) == Ack()
    # a requeue_after is not a failure: it goes back with attempt 0 whatever the attempt was
    assert d(Result(requeue_after=42.0), attempt=2) == Delay(42.0, 0)


def test_failures_back_off_then_park():
    # Given a policy of 3 attempts, 1 s doubling, no jitter
    # When attempts 0, 1, 2 fail
    first, second, third = (d(RuntimeError("boom"), attempt=a) for a in range(3))
    # Then the first two are retried later and later, carrying the failure count; the third parks
    assert first == Delay(1.0, 1, "RuntimeError: boom")
    assert second == Delay(2.0, 2, "RuntimeError: boom")
    assert third == Park(codec.PARK_MAX_ATTEMPTS, "after 3 attempts: RuntimeError: boom")


def test_permanent_parks_at_once_with_its_message():
    assert d(Permanent("spec invalid")) == Park(codec.PARK_PERMANENT, "spec invalid")
    assert d(Permanent()) == Park(codec.PARK_PERMANENT, "Permanent")


@pytest.mark.parametrize("exc", [SystemExit(3), KeyboardInterrupt(), BaseException("odd")])
def test_base_exceptions_are_this_reconciles_failure(exc):
    out = d(exc)
    assert isinstance(out, Delay) and out.error.startswith(type(exc).__name__)


def test_a_wrong_return_type_is_a_failure_naming_it():
    out = d("done")
    assert isinstance(out, Delay) and out.error.startswith("TypeError: reconcile returned str 'done'")


def test_a_timeout_says_how_long():
    assert d(TimeoutError()).error == "TimeoutError: reconcile exceeded 30s"


def test_jitter_comes_from_the_rand_passed_in():
    jittery = RetryPolicy(base_s=10.0, factor=2.0, max_delay_s=60.0, max_attempts=5, jitter=0.2)
    low = decide(ValueError(), policy=jittery, attempt=0, timeout_s=1, rand=lambda: 0.0)
    high = decide(ValueError(), policy=jittery, attempt=0, timeout_s=1, rand=lambda: 0.999999)
    assert math.isclose(low.seconds, 8.0) and math.isclose(high.seconds, 12.0, rel_tol=1e-5)


def test_a_loop_blocker_is_blamed_like_a_death_retried_then_parked_naming_the_block():
    from pool.errors import LoopBlocked

    policy = RetryPolicy(base_s=1.0, factor=2.0, max_delay_s=60.0, max_attempts=8, jitter=0.0)

    def blocked(deaths: int, attempt: int = 0):
        return decide(LoopBlocked(2.04), policy=policy, attempt=attempt, timeout_s=30.0, rand=lambda: 0.5,
                      deaths=deaths, max_deliveries=3)
    # Given an event that blocked the loop, carrying no deaths yet
    first = blocked(0)
    # Then it is retried with backoff (not at once), carrying one death, the block named
    assert isinstance(first, Delay) and first.seconds == 1.0 and first.attempt == 1 and first.deaths == 1
    assert "held the event loop for 2.0s" in first.error and "1 of --max-deliveries 3" in first.error
    # and the retry after that carries two; the third block parks it as loop-blocked
    assert blocked(1, attempt=1).deaths == 2
    third = blocked(2, attempt=2)
    assert isinstance(third, Park) and third.reason == codec.PARK_LOOP_BLOCKED and "2.0s" in third.error
    # Other failures don't add deaths: a retry starts its own count
    assert d(RuntimeError("boom")).deaths == 0
