"""Backoff policy and delay-tier planning, pure functions with the randomness passed in.

Data flow: a reconcile fails -> ``RetryPolicy.delay_s(attempt, rand)`` says how long to
wait (exponential, capped, with jitter) or ``exhausted(attempt)`` says park it.
A delay (a retry's or a ``requeue_after``) is served by the broker's delay tiers:
``next_hop(delay, tiers)`` picks the tier queue to ride now and the delay left
after it; the message carries that remainder in a header and rides again when it
comes back, so any delay is served to within half the smallest tier.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

# Tier TTLs grow by x4 so any delay up to the largest tier takes at most ~3 hops per
# tier, while a 17-minute tier keeps long requeues at one hop per 17 minutes.
DEFAULT_TIERS_S: tuple[int, ...] = (1, 4, 16, 64, 256, 1024)


@dataclass(frozen=True)
class RetryPolicy:
    """How a controller's failures back off. Set per controller as ``Controller.retry``."""

    base_s: float = 1.0
    """Delay after the first failure."""
    factor: float = 2.0
    """Each further failure multiplies the delay by this."""
    max_delay_s: float = 300.0
    """Cap on one delay, before jitter."""
    max_attempts: int = 8
    """Failures after which the event is parked instead of retried."""
    jitter: float = 0.2
    """Delays are spread uniformly over ±jitter × delay, so a burst of failures doesn't return as a burst."""

    def __post_init__(self) -> None:
        if self.base_s <= 0 or self.factor < 1 or self.max_delay_s < self.base_s:
            raise ValueError("retry policy needs base_s > 0, factor >= 1, max_delay_s >= base_s")
        if self.max_attempts < 1 or not 0 <= self.jitter < 1:
            raise ValueError("retry policy needs max_attempts >= 1 and 0 <= jitter < 1")

    def exhausted(self, failures: int) -> bool:
        """True when ``failures`` failures mean: park, don't retry."""
        return failures >= self.max_attempts

    def delay_s(self, failures: int, rand: Callable[[], float]) -> float:
        """Delay before the retry that follows failure number ``failures`` (1-based).

        ``rand`` returns a float in [0, 1) (``random.random`` in production).
        """
        exponent = max(failures - 1, 0)
        # Compare in logs: factor**exponent may overflow a float long after it passed the cap.
        if exponent * math.log(self.factor) >= math.log(self.max_delay_s / self.base_s):
            raw = self.max_delay_s
        else:
            raw = min(self.base_s * self.factor**exponent, self.max_delay_s)
        return raw * (1 + self.jitter * (2 * rand() - 1))


def next_hop(delay_s: float, tiers_s: Sequence[float]) -> tuple[float | None, float]:
    """The tier to ride for ``delay_s`` and the delay still left after it.

    Returns ``(None, 0)`` when the delay is under half the smallest tier (deliver now).
    Otherwise the largest tier not longer than the delay (the smallest one for delays
    between half of it and it), and the remainder, which is never negative.
    """
    smallest = tiers_s[0]
    if delay_s < smallest / 2:
        return None, 0.0
    tier = smallest
    for t in tiers_s:
        if t <= delay_s:
            tier = t
    return tier, max(delay_s - tier, 0.0)


def tier_name(tier_s: float) -> str:
    """Queue-name suffix for a tier: ``16s``."""
    return f"{tier_s:g}s"


def served_s(delay_s: float, tiers_s: Sequence[float]) -> float:
    """The delay the tiers really serve for ``delay_s``: hop after hop (``next_hop``) until what is
    left is under half the smallest tier (0 for a delay that short: it comes back at once)."""
    served = 0.0
    while True:
        tier, delay_s = next_hop(delay_s, tiers_s)
        if tier is None:
            return served
        served += tier
