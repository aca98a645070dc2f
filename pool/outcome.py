"""What becomes of a reconcile's deliveries: a pure decision, tested with no loop and no broker.

Data flow: the worker hands ``decide`` what the reconcile produced — its return value, or the
exception it raised (any ``BaseException``: a reconcile's ``SystemExit`` is its own failure,
not the worker's) — with the controller's retry policy and the event's attempt count, and gets
back one of:

- ``Ack``: converged; ack every delivery the reconcile covered;
- ``Delay(seconds, attempt, error)``: send the latest event through the delay tiers carrying
  ``attempt``, then ack — a ``requeue_after`` (``error`` empty, attempt 0) or a retry after
  a failure (``error`` says what failed);
- ``Park(reason, error)``: move it to the parking queue with the reason, then ack.

Settling (publishing, confirming, acking) is the worker's; so is what happens when the broker
refuses it. Randomness (the retry jitter) is passed in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .codec import PARK_MAX_ATTEMPTS, PARK_PERMANENT
from .controller import Result
from .errors import Permanent
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
           rand: Callable[[], float]) -> Decision:
    """See the module docstring. ``produced`` is the return value, or the exception raised."""
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
