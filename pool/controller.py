"""What a user writes: a ``Controller`` subclass with one ``reconcile`` method.

Data flow: the worker decodes each delivery with the controller's ``event_type``,
hands the latest event of a key to ``reconcile(key, event, ctx)`` and acts on the
outcome: ``None`` -> converged, ack; ``Result(requeue_after=s)`` -> look again in
``s`` seconds; ``Permanent`` -> park now; any other exception -> retry per
``retry``. Events a reconcile emits with ``ctx.publish`` are confirmed by the broker
before the triggering deliveries are acked.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib
import math
from dataclasses import dataclass
from typing import Any, Awaitable, ClassVar, Protocol

from .errors import ConfigError
from .retries import RetryPolicy
from .text import escape


Event = Any
"""A decoded event: an instance of the controller's ``event_type``, or plain JSON values."""

# The longest ``requeue_after``: a year. A longer one is a unit mistake (ms for s), and each
# hop through the largest delay tier carries the rest, so an absurd one would ride for ever.
MAX_REQUEUE_AFTER_S = 365 * 24 * 3600


@dataclass(frozen=True, slots=True)
class Result:
    """What a reconcile may return instead of ``None``."""

    requeue_after: float | None = None
    """Reconcile this key again after this many seconds (served by the delay tiers); 0 to a year."""

    def __post_init__(self) -> None:
        v = self.requeue_after
        if v is None:
            return
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"Result(requeue_after=...) must be None or a number of seconds, got {v!r}")
        if not (math.isfinite(v) and 0 <= v <= MAX_REQUEUE_AFTER_S):
            raise ValueError(f"Result(requeue_after=...) must be from 0 to {MAX_REQUEUE_AFTER_S} seconds "
                             f"(a year), got {v!r}")


class Controller:
    """Base class. Subclasses set ``name`` and implement ``reconcile`` (``async def`` or plain ``def``).

    A plain ``def reconcile`` runs in the worker's thread pool; there ``ctx.publish``
    is called without ``await``.
    """

    name: ClassVar[str] = ""
    """The controller's name: exchange ``ctl.<name>``, the ``controller`` argument of publishes."""
    event_type: ClassVar[type | None] = None
    """A ``msgspec.Struct`` to decode and validate events into; ``None`` for plain JSON."""
    retry: ClassVar[RetryPolicy] = RetryPolicy()
    """How failures back off and when they park."""

    def setup(self) -> None:
        """Called once in each worker before consuming (open stores, clients)."""

    def reconcile(self, key: str, event: Event, ctx: "Context") -> "Result | None | Awaitable[Result | None]":
        raise NotImplementedError


class Context:
    """Per-reconcile handle: metadata about the event and a way to emit events."""

    __slots__ = ("controller", "key", "attempt", "coalesced", "partition", "_runtime", "_confirms")

    def __init__(self, runtime: "Runtime", controller: str, key: str, attempt: int, coalesced: int, partition: int) -> None:
        self.controller = controller
        self.key = key
        self.attempt = attempt
        """Failures so far of this event (0 on the first try)."""
        self.coalesced = coalesced
        """Deliveries merged into this reconcile beyond the first."""
        self.partition = partition
        self._runtime = runtime
        self._confirms: list[Any] = []

    def publish(self, controller: str, key: str, payload: Any) -> Awaitable[None] | concurrent.futures.Future[None]:
        """Emit an event for ``controller``'s item ``key``; acked deliveries wait for its confirm.

        From an ``async def`` reconcile, ``await`` it (or not: the worker awaits it anyway).
        From a plain ``def`` reconcile (a thread), call it; it returns a concurrent future.
        """
        return self._runtime.emit(self, controller, key, payload)

    def check(self) -> None:
        """Raise ``pool.fence.Fenced`` (a ``CancelledError``) if this worker may have lost the item's
        partition: its lease on the broker ran out (a frozen process, a blocked loop). Async
        reconciles are checked before every step anyway; a long plain-def reconcile calls this
        before each side effect. ``publish`` checks it too."""
        self._runtime.check_lease()


class Runtime(Protocol):
    """What a ``Context`` needs from the worker that runs the reconcile."""

    def emit(self, ctx: Context, controller: str, key: str, payload: Any) -> Any: ...

    def check_lease(self) -> None: ...


def load_controller(ref: str) -> Controller:
    """Instantiate ``module:Class``, with a one-line ConfigError when that fails, whatever the user's code raised."""
    mod_name, _, cls_name = ref.partition(":")
    try:
        module = importlib.import_module(mod_name)
    except ImportError as exc:
        raise ConfigError(f"--controllers: cannot import {mod_name!r}: {escape(exc)}") from None
    except (Exception, SystemExit) as exc:  # a SyntaxError, or the module's own code failing
        raise ConfigError(f"--controllers: importing {mod_name!r} failed: {_one_line(exc)}") from None
    cls = getattr(module, cls_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Controller)):
        raise ConfigError(f"--controllers: {ref!r} is not a Controller subclass")
    name = cls.name
    if not isinstance(name, str) or not name or escape(name) != name or any(c in name for c in " ./"):
        raise ConfigError(f"--controllers: {ref!r} needs a class attribute name, a string without spaces, dots, "
                          f"slashes or control characters; got {name!r}")
    try:
        return cls()
    except Exception as exc:
        raise ConfigError(f"--controllers: creating {ref!r} failed: {_one_line(exc)}") from None


def _one_line(exc: BaseException) -> str:
    return escape(f"{type(exc).__name__}: {exc}")


def is_async(controller: Controller) -> bool:
    return asyncio.iscoroutinefunction(controller.reconcile)
