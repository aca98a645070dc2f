"""Unit tests of pool.retries: backoff with injected randomness, and delay-tier planning."""

from __future__ import annotations

import pytest

from pool.retries import DEFAULT_TIERS_S, RetryPolicy, next_hop, tier_name

NO_JITTER = lambda: 0.5  # noqa: E731 - 2*0.5-1 == 0: the raw delay
LOWEST = lambda: 0.0  # noqa: E731 - the bottom of the jitter range
HIGHEST = lambda: 0.999  # noqa: E731 - just under the top (rand is in [0, 1))


def ride(delay_s: float, tiers: tuple[float, ...]) -> list[float]:
    """The tiers a message rides for ``delay_s``, hop after hop, as the worker does."""
    hops = []
    remaining = delay_s
    while True:
        tier, remaining = next_hop(remaining, tiers)
        if tier is None:
            return hops
        hops.append(tier)
        assert remaining >= 0
        assert len(hops) < 10_000, "next_hop does not converge"


# ---- RetryPolicy.delay_s ----

def test_delay_grows_exponentially_from_base() -> None:
    # Given a policy 1 s, x2, cap 300 s
    policy = RetryPolicy(base_s=1.0, factor=2.0, max_delay_s=300.0, jitter=0.2)
    # When we ask for the first few delays with the midpoint of the jitter range
    delays = [policy.delay_s(n, NO_JITTER) for n in range(1, 6)]
    # Then they double each time from base_s
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0]


def test_delay_is_capped_at_max_delay() -> None:
    # Given a policy capped at 300 s
    policy = RetryPolicy(base_s=1.0, factor=2.0, max_delay_s=300.0, jitter=0.2)
    # When many failures have happened (far past the cap, and absurdly many)
    # Then the delay before jitter is the cap
    assert policy.delay_s(9, NO_JITTER) == 256.0
    assert policy.delay_s(10, NO_JITTER) == 300.0
    assert policy.delay_s(1000, NO_JITTER) == 300.0
    assert policy.delay_s(10**6, NO_JITTER) == 300.0


def test_slow_growth_still_reaches_the_cap() -> None:
    # Given a gently growing policy (x1.05) that allows many attempts
    policy = RetryPolicy(base_s=1.0, factor=1.05, max_delay_s=300.0, max_attempts=1000, jitter=0.0)
    # When a retry follows failure 150 (1.05**149 ~ 1400 s raw)
    delay = policy.delay_s(150, NO_JITTER)
    # Then the cap applies, not some lower plateau
    assert delay == 300.0
    # And below the cap it is exactly exponential
    assert policy.delay_s(100, NO_JITTER) == pytest.approx(1.05**99)


def test_huge_factor_does_not_overflow() -> None:
    # Given a policy whose factor overflows a float within 64 steps
    policy = RetryPolicy(base_s=1.0, factor=1e6, max_delay_s=3600.0, jitter=0.0)
    # When many failures have happened
    delay = policy.delay_s(100, NO_JITTER)
    # Then the delay is the cap (and no OverflowError)
    assert delay == 3600.0


def test_factor_one_is_a_constant_delay() -> None:
    # Given a policy that does not grow
    policy = RetryPolicy(base_s=5.0, factor=1.0, max_delay_s=5.0, jitter=0.0)
    # When asked for the 1st and the 50th delay
    # Then both are base_s
    assert policy.delay_s(1, NO_JITTER) == policy.delay_s(50, NO_JITTER) == 5.0


def test_zero_failures_is_treated_as_the_first() -> None:
    # Given the default policy
    policy = RetryPolicy()
    # When asked for failure 0
    # Then it answers base_s rather than something smaller
    assert policy.delay_s(0, NO_JITTER) == policy.base_s


@pytest.mark.parametrize("failures", [1, 3, 8, 30])
def test_jitter_stays_within_bounds(failures: int) -> None:
    # Given a policy with 20% jitter and the raw delay for this failure
    policy = RetryPolicy(base_s=1.0, factor=2.0, max_delay_s=300.0, jitter=0.2)
    raw = policy.delay_s(failures, NO_JITTER)
    # When rand returns its extremes
    low, high = policy.delay_s(failures, LOWEST), policy.delay_s(failures, HIGHEST)
    # Then the delay spans [raw*0.8, raw*1.2), reaching the bottom exactly
    assert low == pytest.approx(raw * 0.8)
    assert raw * 1.199 < high < raw * 1.2
    assert low < raw < high


def test_no_jitter_ignores_rand() -> None:
    # Given a policy without jitter
    policy = RetryPolicy(base_s=2.0, factor=3.0, max_delay_s=100.0, jitter=0.0)
    # When rand returns anything
    # Then the delay is the raw one
    assert {policy.delay_s(2, r) for r in (LOWEST, NO_JITTER, HIGHEST)} == {6.0}


def test_delay_calls_rand_once_per_delay() -> None:
    # Given a rand that counts its calls
    calls = []

    def rand() -> float:
        calls.append(1)
        return 0.5

    # When one delay is computed
    RetryPolicy().delay_s(3, rand)
    # Then rand was used once (the caller's stream stays reproducible)
    assert len(calls) == 1


def test_exhausted_after_max_attempts() -> None:
    # Given a policy allowing 3 attempts
    policy = RetryPolicy(max_attempts=3)
    # When asking after 0..4 failures
    # Then failures 3 and more mean park
    assert [policy.exhausted(n) for n in range(5)] == [False, False, False, True, True]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"base_s": 0.0},
        {"base_s": -1.0},
        {"factor": 0.5},
        {"base_s": 10.0, "max_delay_s": 5.0},
        {"max_attempts": 0},
        {"jitter": -0.1},
        {"jitter": 1.0},
    ],
)
def test_invalid_policy_is_refused(kwargs: dict[str, float]) -> None:
    # Given an invalid parameter
    # When a policy is built with it
    # Then it is refused with a message naming the constraint
    with pytest.raises(ValueError, match="retry policy needs"):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


def test_policy_is_frozen() -> None:
    # Given a policy
    policy = RetryPolicy()
    # When someone tries to change it
    # Then it refuses (a controller's class attribute is shared by every reconcile)
    with pytest.raises(AttributeError):
        policy.base_s = 2.0  # type: ignore[misc]


# ---- next_hop ----

def test_tiny_delay_is_delivered_now() -> None:
    # Given the default tiers (smallest 1 s)
    # When the delay is under half of it
    # Then no tier is ridden and nothing remains
    for delay in (0.0, 0.1, 0.499):
        assert next_hop(delay, DEFAULT_TIERS_S) == (None, 0)


def test_delay_between_half_and_smallest_tier_rides_the_smallest() -> None:
    # Given the default tiers
    # When the delay is between half the smallest tier and the tier
    # Then it rides the smallest tier and nothing remains
    assert next_hop(0.5, DEFAULT_TIERS_S) == (1, 0.0)
    assert next_hop(0.9, DEFAULT_TIERS_S) == (1, 0.0)


def test_picks_the_largest_tier_not_longer_than_the_delay() -> None:
    # Given the default tiers
    # When the delay is 100 s
    tier, remaining = next_hop(100.0, DEFAULT_TIERS_S)
    # Then it rides 64 s and carries 36 s
    assert (tier, remaining) == (64, 36.0)
    assert next_hop(64.0, DEFAULT_TIERS_S) == (64, 0.0)


@pytest.mark.parametrize("tiers", [DEFAULT_TIERS_S, (2, 8, 32), (1,), (5, 60, 3600)])
def test_every_delay_is_served_within_half_the_smallest_tier(tiers: tuple[int, ...]) -> None:
    # Given delays from 0 to 3x the largest tier, in steps that hit and miss tier edges
    delays = [i * 0.37 for i in range(int(3 * tiers[-1] / 0.37) + 1)] + [t + d for t in tiers for d in (-0.5, 0, 0.5)]
    for delay in delays:
        # When the message rides hop after hop until nothing remains
        hops = ride(delay, tiers)
        # Then the time ridden is the delay to within half the smallest tier
        assert abs(sum(hops) - delay) <= tiers[0] / 2 + 1e-9, (delay, hops)


def test_short_delays_take_few_hops_per_tier() -> None:
    # Given the default tiers, x4 apart
    # When any delay up to the largest tier is ridden
    worst = max(len(ride(d * 0.5, DEFAULT_TIERS_S)) for d in range(2 * DEFAULT_TIERS_S[-1] + 1))
    # Then it never rides a tier more than 3 times (+1 for rounding up at the smallest tier)
    assert worst <= 3 * len(DEFAULT_TIERS_S) + 1


def test_long_delay_rides_the_largest_tier_several_times() -> None:
    # Given the default tiers (largest 1024 s)
    # When the delay is 3 h
    hops = ride(3 * 3600.0, DEFAULT_TIERS_S)
    # Then it rides 1024 s ten times, then smaller tiers for the rest, largest first
    assert hops[:10] == [1024] * 10
    assert 1024 not in hops[10:]
    assert hops == sorted(hops, reverse=True)
    assert sum(hops) == 3 * 3600


def test_remaining_is_never_negative() -> None:
    # Given delays just over half the smallest tier
    # When the hop rounds up to the smallest tier
    tier, remaining = next_hop(0.75, (1, 4))
    # Then the remainder is clamped to zero
    assert (tier, remaining) == (1, 0.0)


def test_tier_name() -> None:
    # Given tier lengths, whole or not
    # When named
    # Then the name is compact seconds
    assert [tier_name(t) for t in (1, 16, 1024, 0.5)] == ["1s", "16s", "1024s", "0.5s"]


def test_the_delay_the_tiers_really_serve():
    from pool.retries import served_s

    tiers = (1, 4, 16, 64)
    assert served_s(0.2, tiers) == 0  # under half the smallest: at once
    assert served_s(0.6, tiers) == 1  # half the smallest or more: one ride on it
    assert served_s(30, tiers) == 30  # 16 + 4 + 4 + 4 + 1 + 1
    assert served_s(2.4, tiers) == 2  # 1 + 1, and 0.4 left is under half a tier
