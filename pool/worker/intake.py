"""The worker's way in: every delivery of an owned partition, from its arrival to the work queue.

Data flow, per delivery (``on_message``, on the loop thread; nothing in it may raise):

1. held while the partition's guard window is measured or while it is released;
2. undecodable properties (``pool.frames``) or a routing key that is not UTF-8 -> park;
3. inside a reconcile when its worker died ``--max-deliveries`` times -> park;
4. not routed by the ring (another exchange, the default one included, or a ``CC`` header
   naming other keys) -> re-route through the controller's exchange, without ``CC``: only the
   ring puts a key in a partition, else one key could be reconciled by two owners at once;
5. inside the ring-drift guard window -> re-route (``Guard``), no reconcile;
6. still owes a delay (``x-ctlpool-delay-ms``) -> ride the next delay tier;
7. decode (undecodable / invalid -> park), then hand a ``Delivery`` to ``Dispatch``.

Parks, re-routes and hops leave through ``Settler`` and are acked on their confirm. Every
header is read defensively (``codec.header_int``): a forged or corrupt value is ignored,
never trusted, and can't raise.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

from .. import codec, journal
from ..amqp import Channel
from ..codec import DecodeFailed
from .guard import Guard
from .parts import Delivery, Partition, WorkerStats
from .settle import Settler, carried_headers

log = logging.getLogger("ctlpool.worker")

BLAME_TTL_S = 600.0  # a crashed reconcile's event not seen again within this long is forgotten
MISROUTED_LOG_S = 60.0  # deliveries that bypassed the ring are logged this often per controller, with a count


class Intake:
    def __init__(self, *, settler: Settler, guard: Guard, stats: WorkerStats, dispatch: Callable[[Delivery], None],
                 max_deliveries: int, clock: Callable[[], float], worker: int) -> None:
        self._settler = settler
        self._guard = guard
        self._stats = stats
        self._dispatch = dispatch
        self._max_deliveries = max_deliveries
        self._clock = clock
        self._worker = worker
        # events inside a reconcile when this slot's last process died -> (deaths blamed, forget after)
        self._blamed: dict[bytes, tuple[int, float]] = {}
        self._misrouted: dict[str, tuple[float, int]] = {}  # controller -> (last logged, re-routed since)

    def blame(self, leftover: dict[bytes, int]) -> None:
        """The events this slot's previous process died holding (``pool.journal``)."""
        expires = self._clock() + BLAME_TTL_S
        self._blamed = {d: (n, expires) for d, n in leftover.items()}

    def forget_blame(self) -> None:
        """While any blame is left every redelivery pays for a digest: forget them in time."""
        if self._blamed:
            now = self._clock()
            self._blamed = {d: b for d, b in self._blamed.items() if b[1] > now}

    def on_message(self, part: Partition, ch: Channel, method: Any, props: Any, body: bytes) -> None:
        self._stats.deliveries += 1
        part.unacked += 1
        part.acks.delivered(method.delivery_tag)
        if part.held is not None:  # measuring the guard window, or releasing
            part.held.append((method, props, body))
            return
        try:
            d = self._admit(part, ch, method, props, body)
        except Exception as exc:  # noqa: BLE001 - nothing in one delivery's path may take the connection down
            log.exception("delivery could not be handled; parking it", extra={"worker": self._worker,
                                                                           "controller": part.ctl.name})
            try:
                self._settler.park_raw(part, ch, method, props, body, codec.PARK_INTERNAL,
                                       f"{type(exc).__name__}: {exc}")
            except Exception:  # noqa: BLE001 - not even parkable: the broker keeps it
                log.exception("could not park it either", extra={"worker": self._worker})
                self._settler.return_later(part, ch, method.delivery_tag)
            return
        if d is not None:
            self._dispatch(d)

    def _admit(self, part: Partition, ch: Channel, method: Any, props: Any, body: bytes) -> Delivery | None:
        """A delivery for the work queue, or None when it was parked, re-routed or sent on a delay hop."""
        headers = props.headers
        if headers is not None and codec.H_BAD_FRAME in headers:  # see pool.frames
            self._settler.park_raw(part, ch, method, props, body, codec.PARK_BAD_HEADERS,
                                   f"headers could not be decoded: {headers[codec.H_BAD_FRAME]}")
            return None
        if isinstance(method.routing_key, bytes):  # pika leaves a key that isn't UTF-8 as bytes
            self._settler.park_raw(part, ch, method, props, body, codec.PARK_BAD_KEY,
                                   f"the routing key (the item key) is not UTF-8: {method.routing_key[:100]!r}")
            return None
        redeliveries = 0
        if self._blamed or (headers is not None and codec.H_REDELIVERIES in headers):  # rare: skip the call
            redeliveries = self.redeliveries(headers, method, body)
            if redeliveries >= self._max_deliveries:
                self._settler.park_raw(part, ch, method, props, body, codec.PARK_DELIVERIES,
                                       f"its worker died inside its reconcile {redeliveries} times")
                return None
        if method.exchange != part.ctl.exchange or (headers is not None and ("CC" in headers or "BCC" in headers)):
            self._reroute_misrouted(part, ch, method, props, body, redeliveries)
            return None
        if self._guard.wants(part, method):
            self._guard.reroute(part, ch, method, props, body, redeliveries)
            return None
        attempt = 0
        if headers is not None:
            if codec.H_DELAY_MS in headers:
                delay_ms = codec.header_int(headers, codec.H_DELAY_MS, codec.MAX_DELAY_MS)
                if delay_ms:
                    self._settler.hop(part, ch, method, props, body, delay_ms / 1000.0, redeliveries)
                    return None
            if codec.H_ATTEMPT in headers:
                attempt = codec.header_int(headers, codec.H_ATTEMPT, codec.MAX_ATTEMPT) or 0
        try:
            event = part.ctl.decode(body)
        except DecodeFailed as exc:
            self._settler.park_raw(part, ch, method, props, body, exc.reason, str(exc))
            return None
        return Delivery(part, ch, method.delivery_tag, method.routing_key, event, headers, attempt, body,
                        props, redeliveries, self._clock())

    def _reroute_misrouted(self, part: Partition, ch: Channel, method: Any, props: Any, body: bytes,
                           redeliveries: int) -> None:
        """A delivery the ring did not route here: send it through the ring, saying how it came."""
        headers = carried_headers(props.headers, redeliveries)  # without CC/BCC (codec.clean_headers)
        cc = [h for h in codec.ROUTING_HEADERS if h in (props.headers or {})]
        how = f"exchange {method.exchange!r}" if method.exchange != part.ctl.exchange else "header " + "/".join(cc)
        headers[codec.H_MISROUTED] = how
        self._settler.forward(part, ch, method, props, body, part.ctl.exchange, headers)
        self._stats.rerouted += 1
        now = self._clock()
        last, count = self._misrouted.get(part.ctl.name, (-1e9, 0))
        if now - last < MISROUTED_LOG_S:
            self._misrouted[part.ctl.name] = (last, count + 1)
            return
        self._misrouted[part.ctl.name] = (now, 0)
        log.warning("a delivery reached %s through %s, not through the ring; re-routing it through %s (%d more "
                    "since the last such line). Publish to the controller's exchange without CC; see the README's "
                    "permissions", part.queue, how, part.ctl.exchange, count,
                    extra={"worker": self._worker, "controller": part.ctl.name, "key": method.routing_key})

    def redeliveries(self, headers: dict[str, Any] | None, method: Any, body: bytes) -> int:
        """Times this event was inside a reconcile when its worker died: what it carries (counted
        by other workers, kept across re-routes) or what this slot's journal says, the larger.
        Redeliveries for any other reason (connection flaps, broker restarts, drains, a frozen
        worker) don't count. The journal's count is kept, not used up: a re-routed copy and the
        original it came from (acked a moment later) are the same event. Only a redelivered
        message can be one the dead worker held, so only those pay for the digest."""
        carried = 0
        if headers is not None and codec.H_REDELIVERIES in headers:
            carried = codec.header_int(headers, codec.H_REDELIVERIES, codec.MAX_ATTEMPT) or 0
        if self._blamed and method.redelivered:
            blame = self._blamed.get(journal.digest(method.routing_key, body))
            if blame is not None:
                return max(carried, blame[0])
        return carried

    def reroute_held(self, part: Partition, ch: Channel) -> list[asyncio.Future[None]]:
        """A release: send every held delivery back through the exchange (acked on confirm)."""
        futs = []
        for method, props, body in part.held or ():
            n = self.redeliveries(props.headers, method, body)
            futs.append(self._settler.forward(part, ch, method, props, body, part.ctl.exchange,
                                              carried_headers(props.headers, n)))
        part.held = []
        return futs
