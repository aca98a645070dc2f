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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, ClassVar

from .errors import ConfigError
from .retries import RetryPolicy

if TYPE_CHECKING:
    from .worker import Runtime

Event = Any
"""A decoded event: an instance of the controller's ``event_type``, or plain JSON values."""


@dataclass(frozen=True, slots=True)
class Result:
    """What a reconcile may return instead of ``None``."""

    requeue_after: float | None = None
    """Reconcile this key again after this many seconds (served by the delay tiers)."""


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


def load_controller(ref: str) -> Controller:
    """Instantiate ``module:Class``, with a one-line ConfigError when that fails."""
    mod_name, _, cls_name = ref.partition(":")
    try:
        module = importlib.import_module(mod_name)
    except ImportError as exc:
        raise ConfigError(f"--controllers: cannot import {mod_name!r}: {exc}") from None
    cls = getattr(module, cls_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Controller)):
        raise ConfigError(f"--controllers: {ref!r} is not a Controller subclass")
    if not cls.name or any(c in cls.name for c in " ./"):
        raise ConfigError(f"--controllers: {ref!r} needs a class attribute name without spaces, dots or slashes")
    return cls()


def is_async(controller: Controller) -> bool:
    return asyncio.iscoroutinefunction(controller.reconcile)
