"""What the worker's rooms share: a controller as the worker sees it, a partition it holds, a
delivery waiting for (or covered by) a reconcile, and the worker's counters. Plain data, no I/O.

Data flow: ``Ownership`` creates a ``Partition`` when it acquires one and drops it when it
releases it; ``Intake`` turns each delivery of a partition into a ``Delivery``; ``Dispatch``
counts a partition's deliveries inside running reconciles (``dispatched`` / ``idle``, what a
release waits for); ``Settler`` acks through the partition's ``AckBatch``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from .. import codec
from ..acks import AckBatch
from ..amqp import Channel
from ..controller import Controller, is_async
from ..names import Names


class Ctl:
    """A controller, what the worker derives from it once, and its live layout (``Follow`` keeps it)."""

    __slots__ = ("index", "controller", "name", "names", "decode", "is_async", "exchange", "partitions", "version",
                 "paused", "resumed_at", "resizes")

    def __init__(self, index: int, controller: Controller, prefix: str, partitions: int) -> None:
        self.index = index
        self.controller = controller
        self.name = controller.name
        self.names = Names(prefix, controller.name)
        self.exchange = self.names.exchange
        self.decode = codec.make_decoder(controller.event_type)
        self.is_async = is_async(controller)
        self.partitions = partitions  # the live layout's count (``--partitions`` until it is read)
        self.version = 0  # the live layout's version (0: not read yet)
        self.paused = False  # a resize asks every member to hold none of its partitions
        self.resumed_at = 0.0  # when it was last unpaused (clock): members holding none are given time
        self.resizes = 0  # resizes completed, as the live layout says (a metric)


class Partition:
    """One partition queue this worker consumes (or is acquiring / releasing)."""

    __slots__ = ("ctl", "index", "queue", "ch", "guard_left", "held", "dispatched", "idle",
                 "releasing", "acquiring", "acquired_at", "rerouted", "unacked", "guarding", "guard_futs", "may_mark", "acks",
                 "leaving", "subscribed", "_oldest", "_oldest_since")

    def __init__(self, ctl: Ctl, index: int, queue: str) -> None:
        self.ctl = ctl
        self.index = index
        self.queue = queue
        self.ch: Channel | None = None
        self.guard_left = 0  # deliveries still to re-route (ring-drift guard window)
        self.guarding = False  # not known clean in this broker epoch: re-route backlog and redeliveries
        self.guard_futs: list[asyncio.Future[None]] = []  # confirms of the window's re-routes
        self.may_mark = False  # we were the only consumer when the window was measured
        self.acks = AckBatch()  # of the current channel
        self.held: list[tuple[Any, Any, bytes]] | None = None  # deliveries parked while measuring/releasing
        self.dispatched = 0  # deliveries of this partition inside running reconciles
        self.idle = asyncio.Event()
        self.idle.set()
        self.releasing = False
        self.leaving = False  # waiting for its new owner to subscribe before releasing (Ownership.hand_over)
        self.subscribed = False  # the broker accepted our consumer (active, or a single-active-consumer standby)
        self.acquiring: asyncio.Task[None] | None = None  # the acquisition in progress (a release waits for it)
        self.acquired_at = 0.0
        self.rerouted = 0
        self.unacked = 0  # deliveries received and not yet acked (shown by ``ctlpool status``)
        self._oldest: int | None = None  # the oldest unacked tag seen by ``unacked_age``...
        self._oldest_since = 0.0  # ...and since when

    def unacked_age(self, now: float) -> float:
        """How long the oldest delivery not yet acked has been held, to within the interval between
        calls (the worker calls this every tick: nothing is timed per delivery)."""
        oldest = self.acks.oldest
        if oldest != self._oldest:
            self._oldest, self._oldest_since = oldest, now
        return 0.0 if oldest is None else now - self._oldest_since

    @property
    def active(self) -> bool:
        """Subscribed, and not on its way out: what a heartbeat announces as held."""
        return self.subscribed and not self.releasing


class Delivery:
    """A decoded delivery waiting in, or covered by, a reconcile."""

    __slots__ = ("part", "ch", "tag", "key", "event", "headers", "attempt", "body", "props", "redeliveries",
                 "queued_at")

    def __init__(self, part: Partition, ch: Channel, tag: int, key: str, event: Any, headers: dict[str, Any] | None,
                 attempt: int, body: bytes, props: Any, redeliveries: int, queued_at: float) -> None:
        self.part = part
        self.ch = ch
        self.tag = tag
        self.key = key
        self.event = event
        self.headers = headers
        self.attempt = attempt
        self.body = body
        self.props = props  # the delivery's AMQP properties: a copy keeps them (``pool.copies``)
        self.redeliveries = redeliveries
        self.queued_at = queued_at


@dataclass
class WorkerStats:
    """Counters since the worker started (read by metrics and tests)."""

    deliveries: int = 0
    reconciles: int = 0
    succeeded: int = 0
    failed: int = 0
    requeued: int = 0
    parked: dict[str, int] = field(default_factory=dict)
    rerouted: int = 0
    hops: int = 0
    acquisitions: int = 0
    releases: int = 0
