"""The ring-drift guard: on acquiring a partition, re-route the backlog an earlier ring may have put there.

Why: the consistent-hash exchange's ring can differ after a broker restart (DESIGN fact 1), so
messages enqueued before it may sit in a partition whose owner no longer owns their key. The
owner re-routes them through the exchange, which sends each to the partition its key hashes
to now.

Data flow: ``Ownership`` subscribes with ``part.held`` set (deliveries are held, not
dispatched) and calls ``measure``: the window is what is held plus what the queue still has
ready. The held deliveries are then fed back to ``Intake``, which calls ``reroute`` for every
delivery inside the window (and for redeliveries, which a dead consumer may have left) and
dispatches the rest. When the whole window is re-routed and confirmed, and we were the
partition's only consumer, a clean marker spares later owners in this broker epoch.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

from ..amqp import Channel, ChannelGone
from ..metrics import WorkerMetrics
from ..topology import declare_clean_marker
from .parts import Partition, WorkerStats
from .settle import Settler, carried_headers

log = logging.getLogger("ctlpool.worker")

OnMessage = Callable[[Partition, Channel, Any, Any, bytes], None]


class Guard:
    def __init__(self, *, settler: Settler, stats: WorkerStats, metrics: WorkerMetrics,
                 clock: Callable[[], float], worker: int) -> None:
        self._settler = settler
        self._stats = stats
        self._metrics = metrics
        self._clock = clock
        self._worker = worker

    async def measure(self, part: Partition, ch: Channel, refeed: OnMessage) -> None:
        """Right after subscribing: the backlog to re-route is what we hold plus what is still ready.

        Every message routed by an earlier ring was enqueued before the broker restart that
        preceded this connection, so it is in this count (or comes back redelivered, which is
        re-routed too). Over-counting only re-routes a few fresh events, which is harmless."""
        try:
            ok = await ch.rpc("queue_declare", queue=part.queue, passive=True)
        except ChannelGone:
            return
        if part.releasing:
            return  # the release re-routes what is held
        held = part.held or []
        part.guard_left = window = len(held) + ok.method.message_count
        # Another consumer (a standby, or an owner still finishing) may hold deliveries we can't
        # count; only a sole consumer may declare the partition clean afterwards.
        part.may_mark = ok.method.consumer_count <= 1
        if not window and part.may_mark:
            asyncio.ensure_future(self._mark_clean(part, []))
        if window:
            log.info("acquired %s: re-routing %d backlog events", part.queue, window,
                     extra={"worker": self._worker, "partition": part.index, "controller": part.ctl.name})
        part.held = None
        # counted once already, when held (nothing arrives unheld while held is set, so
        # they are the newest tags); refeed counts them again
        self._stats.deliveries -= len(held)
        part.unacked -= len(held)
        part.acks.forget_newest(len(held))
        for method, props, body in held:
            refeed(part, ch, method, props, body)

    def wants(self, part: Partition, method: Any) -> bool:
        """Whether this delivery is re-routed rather than dispatched."""
        return part.guarding and (part.guard_left > 0 or method.redelivered)

    def reroute(self, part: Partition, ch: Channel, method: Any, props: Any, body: bytes, redeliveries: int) -> None:
        """Backlog from before we held the partition, or returned by a consumer that died (maybe
        mid-guard): it may have been routed by an earlier ring, so route it again."""
        fut = self._settler.forward(part, ch, method, props, body, part.ctl.exchange,
                                    carried_headers(props.headers, redeliveries))
        if part.guard_left:
            part.guard_left -= 1
            part.guard_futs.append(fut)
        part.rerouted += 1
        self._stats.rerouted += 1
        self._metrics.rerouted(part.ctl.name)
        if part.guard_left == 0 and part.guard_futs:
            futs, part.guard_futs = part.guard_futs, []
            if part.may_mark:
                asyncio.ensure_future(self._mark_clean(part, futs))
            log.info("%s: ring-drift guard re-routed %d events in %.0f ms", part.queue, part.rerouted,
                     (self._clock() - part.acquired_at) * 1000,
                     extra={"worker": self._worker, "partition": part.index, "controller": part.ctl.name})

    async def _mark_clean(self, part: Partition, futs: list[asyncio.Future[None]]) -> None:
        """Once the whole window is re-routed (confirmed), later acquirers may skip the guard."""
        results = await asyncio.gather(*futs, return_exceptions=True)
        if any(isinstance(r, BaseException) for r in results) or part.ch is None or not part.ch.is_open:
            return  # the next owner re-routes what is left
        try:
            await declare_clean_marker(part.ch, part.ctl.names.clean_marker(part.index, part.ctl.partitions))
        except ChannelGone:
            pass
