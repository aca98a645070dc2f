"""The worker's way out: acks, and republishes acked on their confirm.

Data flow: every settled delivery leaves through here. ``ack`` records the ack in the
partition's ``AckBatch``; ``flush_acks`` runs once at the end of the loop iteration and sends
as few frames as the batch allows (a multiple ack never covers unfinished work). Everything
republished (a re-route, a delay hop, a retry, a parked copy) goes through ``forward`` or
``publish_then_ack``: published on the session's confirm channel, its deliveries acked only
once the broker confirmed it; a refusal is logged and the delivery nacked back to its queue
after ``SETTLE_RETRY_S`` (``return_later``), never acked. A copy keeps the original's AMQP
properties and is fitted into the connection's frame_max (``pool.copies``). ``settle`` carries
out what ``pool.outcome`` decided for a finished reconcile.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

import pika.exceptions

from .. import codec, copies, outcome
from ..amqp import Channel, ChannelGone, ConfirmChannel
from ..errors import PublishError
from ..metrics import WorkerMetrics
from ..retries import next_hop, served_s
from .parts import Ctl, Delivery, Partition, WorkerStats

log = logging.getLogger("ctlpool.worker")

SETTLE_RETRY_S = 5.0  # a delivery whose retry/park publish the broker refused goes back to its queue after this


class Settler:
    """Acks and confirmed republishes for one worker; ``pub`` is the session's confirm channel (None between sessions)."""

    def __init__(self, *, loop: asyncio.AbstractEventLoop, stats: WorkerStats, metrics: WorkerMetrics,
                 tiers: tuple[float, ...], clock: Callable[[], float], wall: Callable[[], float], worker: int) -> None:
        self.pub: ConfirmChannel | None = None
        self._loop = loop
        self._stats = stats
        self._metrics = metrics
        self._tiers = tiers
        self._clock = clock
        self.wall = wall
        self._worker = worker
        self._ack_parts: list[Partition] = []  # partitions with acks to flush this loop iteration

    # ---------------------------------------------------------------- acks

    def ack(self, part: Partition, ch: Channel, tag: int) -> None:
        """Ack at the end of this loop iteration, coalesced with the channel's other acks (``AckBatch``)."""
        if ch is not part.ch or not ch.is_open:
            return  # the channel is gone; the broker has put the delivery back
        part.unacked -= 1
        if part.acks.done(tag):
            self._ack_parts.append(part)
            if len(self._ack_parts) == 1:
                self._loop.call_soon(self.flush_acks)

    def ack_all(self, items: list[Delivery]) -> None:
        for d in items:
            self.ack(d.part, d.ch, d.tag)

    def flush_acks(self) -> None:
        parts, self._ack_parts = self._ack_parts, []
        for part in parts:
            ch = part.ch
            frames = part.acks.flush()
            if ch is not None and ch.is_open:
                try:
                    for tag, multiple in frames:
                        ch.raw.basic_ack(tag, multiple)
                except pika.exceptions.AMQPError:
                    pass  # closing under us (the broker closed the connection): the deliveries go back

    def return_later(self, part: Partition, ch: Channel, tag: int) -> None:
        """A delivery we could not settle (the broker refused its retry or parked copy): put it
        back in its queue after ``SETTLE_RETRY_S``, never ack it, never leave it stuck with us."""
        log.error("returning the delivery to %s in %.0fs; the broker keeps it meanwhile", part.queue,
                  SETTLE_RETRY_S, extra={"worker": self._worker, "controller": part.ctl.name})

        def back() -> None:
            if ch is part.ch and ch.is_open and part.acks.forget(tag):  # not acked meanwhile (a late confirm)
                part.unacked -= 1
                try:
                    ch.raw.basic_nack(tag, multiple=False, requeue=True)
                except pika.exceptions.AMQPError:
                    pass  # closing under us: the broker puts it back anyway
        self._loop.call_later(SETTLE_RETRY_S, back)

    # ---------------------------------------------------------------- confirmed publishes

    def publish(self, exchange: str, key: str, body: bytes, headers: dict[str, Any],
                original: Any = None) -> asyncio.Future[None]:
        """Publish on the session's confirm channel; the future resolves on the broker's confirm.
        ``original``: the properties of the message this is a copy of (``pool.copies``)."""
        if self.pub is None:
            return self._failed(ChannelGone(0, "not connected"))
        props = None
        if original is not None:
            try:
                props = copies.fit(copies.properties(original, headers), self.pub.frame_max)
            except copies.FrameTooLarge as exc:
                return self._failed(PublishError(str(exc)))
        fut = self.pub.publish(exchange, key, body, headers, props)
        sent = self._clock()

        def confirmed(f: asyncio.Future[None]) -> None:  # how long the broker takes to confirm
            if not f.cancelled() and f.exception() is None:
                self._metrics.confirmed(self._clock() - sent)
        fut.add_done_callback(confirmed)
        return fut

    def _failed(self, exc: BaseException) -> asyncio.Future[None]:
        f: asyncio.Future[None] = self._loop.create_future()
        f.set_exception(exc)
        return f

    def publish_then_ack(self, items: list[Delivery], exchange: str, key: str, body: bytes,
                         headers: dict[str, Any], original: Any) -> asyncio.Future[None]:
        """Publish a copy, and ack every one of ``items`` once confirmed (a failure is the awaiting caller's)."""
        fut = self.publish(exchange, key, body, headers, original)

        def done(f: asyncio.Future[None]) -> None:
            if not f.cancelled() and f.exception() is None:
                self.ack_all(items)
        fut.add_done_callback(done)
        return fut

    def forward(self, part: Partition, ch: Channel, method: Any, props: Any, body: bytes, exchange: str,
                headers: dict[str, Any], routing_key: str | None = None) -> asyncio.Future[None]:
        """Republish a raw delivery fresh to ``exchange``; ack it once confirmed, return it if refused."""
        fut = self.publish(exchange, routing_key if routing_key is not None else method.routing_key, body, headers,
                           props)
        tag = method.delivery_tag

        def done(f: asyncio.Future[None]) -> None:
            if f.cancelled():
                return
            exc = f.exception()
            if exc is None:
                self.ack(part, ch, tag)
            elif not isinstance(exc, ChannelGone):
                log.error("republish failed: %s", exc, extra={"worker": self._worker})
                self.return_later(part, ch, tag)
        fut.add_done_callback(done)
        return fut

    def reroute(self, d: Delivery) -> asyncio.Future[None]:
        """Send a decoded delivery back through its controller's exchange (a release's prefetched rest)."""
        return self.publish_then_ack([d], d.part.ctl.exchange, d.key, d.body,
                                     carried_headers(d.headers, d.redeliveries), d.props)

    def hop(self, part: Partition, ch: Channel, method: Any, props: Any, body: bytes, delay_s: float,
            redeliveries: int) -> None:
        """The message still owes ``delay_s``: ride the next tier (or come back now if it's tiny)."""
        headers = carried_headers(props.headers, redeliveries)
        self._stats.hops += 1
        self.forward(part, ch, method, props, body, self.delay_via(part.ctl, delay_s, headers), headers)

    def delay_via(self, ctl: Ctl, delay_s: float, headers: dict[str, Any]) -> str:
        """The exchange that serves ``delay_s`` next (a tier, or the controller's own when it is
        tiny), recording in ``headers`` the delay still owed after that hop."""
        tier, left = next_hop(delay_s, self._tiers)
        if tier is None:
            headers.pop(codec.H_DELAY_MS, None)
            return ctl.exchange
        headers[codec.H_DELAY_MS] = int(left * 1000)
        return ctl.names.tier(tier)

    # ---------------------------------------------------------------- parking

    def park_raw(self, part: Partition, ch: Channel, method: Any, props: Any, body: bytes,
                 reason: str, error: str) -> asyncio.Future[None]:
        """Park a delivery that never reached a reconcile (see ``parked_copy``)."""
        headers = self.parked_copy(part, method.routing_key, props.headers, reason, error)
        return self.forward(part, ch, method, props, body, "", headers, routing_key=part.ctl.names.parked)

    def parked_copy(self, part: Partition, key: str, headers: dict[str, Any] | None, reason: str,
                    error: str) -> dict[str, Any]:
        """The one parking path: count it, log it, and the headers of the copy that goes to
        ``ctl.C.parked`` via the default exchange (the routing key is the queue's name, so the
        item key travels in a header). The caller publishes it and acks on confirm."""
        self._stats.parked[reason] = self._stats.parked.get(reason, 0) + 1
        self._metrics.parked(part.ctl.name, reason)
        log.warning("parking event: %s: %s", reason, error[:300],
                    extra={"worker": self._worker, "controller": part.ctl.name, "key": key})
        out = codec.clean_headers(headers)
        out.update({codec.H_KEY: key, codec.H_REASON: reason, codec.H_ERROR: codec.truncate_error(error),
                    codec.H_PARKED_FROM: part.queue, codec.H_PARKED_MS: int(self.wall() * 1000)})
        return out

    # ---------------------------------------------------------------- a reconcile's outcome

    async def settle(self, ctl: Ctl, key: str, items: list[Delivery], decision: outcome.Decision) -> str:
        """Carry out ``decision`` (``pool.outcome``) for the deliveries a reconcile covered;
        returns controller-runtime's result label."""
        if isinstance(decision, outcome.Ack):
            self._stats.succeeded += 1
            self.ack_all(items)
            return "success"
        last = items[-1]
        if isinstance(decision, outcome.Park):
            if decision.reason != codec.PARK_PERMANENT:
                self._stats.failed += 1
            headers = self.parked_copy(last.part, last.key, last.headers, decision.reason, decision.error)
            await self.publish_then_ack(items, "", ctl.names.parked, last.body, headers, last.props)
            return "error"
        if decision.error:
            self._stats.failed += 1
            self._metrics.retried(ctl.name)
            served = served_s(decision.seconds, self._tiers)
            when = (f"in {served:g}s" if abs(served - decision.seconds) < 0.05 else
                    f"in {served:g}s (the delay tiers serve {decision.seconds:.1f}s so)" if served else
                    f"at once ({decision.seconds:.1f}s is under half the smallest delay tier, {self._tiers[0]:g}s)")
            log.warning("reconcile failed (attempt %d), retrying %s: %s", decision.attempt, when,
                        decision.error[:300], extra={"worker": self._worker, "controller": ctl.name, "key": key,
                                                     "attempt": decision.attempt})
        else:
            self._stats.requeued += 1
        # the latest event rides the delay tiers; every covered delivery is acked on its confirm
        # a retry starts its own death count, but for the loop blocks it carries (pool.outcome)
        headers = carried_headers(last.headers, decision.deaths)
        headers[codec.H_ATTEMPT] = decision.attempt  # 0 for a requeue_after
        exchange = self.delay_via(ctl, decision.seconds, headers)
        await self.publish_then_ack(items, exchange, key, last.body, headers, last.props)
        return "error" if decision.error else "requeue_after"


def carried_headers(headers: dict[str, Any] | None, redeliveries: int) -> dict[str, Any]:
    """A republished copy's headers: cleaned, carrying the event's worker-death count if any."""
    out = codec.clean_headers(headers)
    out.pop(codec.H_REDELIVERIES, None)
    if redeliveries:
        out[codec.H_REDELIVERIES] = redeliveries
    return out
