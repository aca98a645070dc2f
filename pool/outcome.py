"""What becomes of a reconcile's deliveries: a pure decision, tested with no loop and no broker.

Data flow: the worker hands ``decide`` what the reconcile produced — its return value, or the
exception it raised (any ``BaseException``: a reconcile's ``SystemExit`` is its own failure,
not the worker's) — with the controller's retry policy and the event's attempt count, and gets
back one of:

- ``Ack``: converged; ack every delivery the reconcile covered;
- ``Delay(seconds, attempt, error, deaths)``: send the latest event through the delay tiers
  carrying ``attempt`` (and ``deaths``), then ack — a ``requeue_after`` (``error`` empty,
  attempt 0) or a retry after a failure (``error`` says what failed);
- ``Park(reason, error)``: move it to the parking queue with the reason, then ack.

A step that blocked the event loop until ``pool.blocker`` interrupted it (``LoopBlocked``) is
blamed like a death inside a reconcile: one more toward ``--max-deliveries`` (``deaths``, which
the event carries), parked as ``loop-blocked`` at the limit, else retried with backoff.

Settling (publishing, confirming, acking) is the worker's; so is what happens when the broker
refuses it. Randomness (the retry jitter) is passed in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .codec import PARK_LOOP_BLOCKED, PARK_MAX_ATTEMPTS, PARK_PERMANENT
from .controller import Result
from .errors import LoopBlocked, Permanent
from .retries import RetryPolicy


@dataclass(frozen=True, slots=True)
class Ack:
    """Converged: ack."""


@dataclass(frozen=True, slots=True)
class Delay:
    """Look again after ``seconds``; the message carries ``attempt`` (failures so far)."""

    seconds: float
    attempt: int
    error: str = ""
    """Empty for a ``requeue_after``; the failure being retried otherwise."""
    deaths: int = 0
    """Deaths inside a reconcile (and loop blocks) the retried copy carries toward ``--max-deliveries``."""


@dataclass(frozen=True, slots=True)
class Park:
    """Move the event to the parking queue with ``reason`` (a ``codec.PARK_*`` value)."""

    reason: str
    error: str


Decision = Ack | Delay | Park
ACK = Ack()  # the common case, allocated once


def describe(exc: BaseException, timeout_s: float) -> str:
    """The error text a retry logs and a parked event carries."""
    if isinstance(exc, TimeoutError) and not str(exc):
        return f"TimeoutError: reconcile exceeded {timeout_s:g}s"
    return f"{type(exc).__name__}: {exc}"


def decide(produced: Any, *, policy: RetryPolicy, attempt: int, timeout_s: float,
           rand: Callable[[], float], deaths: int = 0, max_deliveries: int = 3) -> Decision:
    """See the module docstring. ``produced`` is the return value, or the exception raised;
    ``deaths`` is what the event carried toward ``max_deliveries``."""
    if isinstance(produced, LoopBlocked):
        return _blocked(produced, policy=policy, attempt=attempt, rand=rand, deaths=deaths + 1,
                        max_deliveries=max_deliveries)
    if isinstance(produced, Permanent):
        return Park(PARK_PERMANENT, str(produced) or "Permanent")
    if not isinstance(produced, BaseException):
        if produced is None:
            return ACK
        if isinstance(produced, Result):
            return ACK if produced.requeue_after is None else Delay(produced.requeue_after, 0)
        produced = TypeError(f"reconcile returned {type(produced).__name__} {str(produced)[:80]!r}; "
                             "expected a Result or None")
    failures = attempt + 1
    error = describe(produced, timeout_s)
    if policy.exhausted(failures):
        return Park(PARK_MAX_ATTEMPTS, f"after {failures} attempts: {error}")
    return Delay(policy.delay_s(failures, rand), failures, error)


def _blocked(exc: LoopBlocked, *, policy: RetryPolicy, attempt: int, rand: Callable[[], float], deaths: int,
             max_deliveries: int) -> Decision:
    error = (f"a reconcile step held the event loop for {exc.seconds:.1f}s (interrupted before the lease ran out; "
             f"{deaths} of --max-deliveries {max_deliveries}); blocking calls belong in a plain def reconcile "
             "or run_in_executor")
    if deaths >= max_deliveries:
        return Park(PARK_LOOP_BLOCKED, error)
    failures = attempt + 1
    if policy.exhausted(failures):
        return Park(PARK_MAX_ATTEMPTS, f"after {failures} attempts: {error}")
    return Delay(policy.delay_s(failures, rand), failures, error, deaths)
