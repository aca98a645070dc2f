"""Parked events: read them, send them back through the exchange, or drop them (``ctlpool parked``).

Data flow: ``ParkingLot.take`` consumes the controller's parking queue ``<prefix>.<C>.parked``
with manual acks and a prefetch of the queue's length, until it holds every message that was
ready when it started (or none arrives for ``IDLE_S``): it sees them all, in queue order,
removing none. Then, for the messages a ``Selection`` matches:

- ``list`` / ``show`` only read;
- ``replay`` publishes a fresh copy through ``<prefix>.<C>`` with the item key as routing key
  (persistent, mandatory, confirmed; body and AMQP properties kept as ``pool.copies`` keeps
  them; the park headers and the attempt count dropped, so the event gets a full retry budget)
  and acks the parked copy only once the broker confirmed the copy. Dying in between leaves
  both: a duplicate, never a loss;
- ``purge`` acks (removes) them.

``close`` cancels the consumer and nacks everything still held back with requeue in one
frame, so untouched messages keep their place and order.

The item key of a parked message is read from the ``x-ctlpool-key`` header, else from
``x-death`` (the broker dead-lettered it from a partition: at its delivery limit, or because
the publisher's per-message ``expiration`` ran out while it waited there); a message with
neither cannot be replayed (the worker parks through the default exchange, so the routing key
is the parking queue's name). What the broker dead-lettered carries no error of ours, so
``describe`` says what happened and how to stop it (``broker_error``).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable


from . import codec, copies
from .amqp import NOT_FOUND, ChannelGone, ConfirmChannel, Connection
from .errors import ConfigError, PublishError
from .topology import Names

IDLE_S = 2.0  # stop waiting for the rest of the queue when nothing arrived this long (another reader took some)
MAX_HELD = 65535  # basic.qos prefetch_count is a 16-bit field: the most one pass can look at

# Headers a replay drops: why and when it was parked, and the retry state that led there.
PARK_HEADERS = frozenset({codec.H_REASON, codec.H_ERROR, codec.H_PARKED_FROM, codec.H_PARKED_MS, codec.H_ATTEMPT,
                          codec.H_DELAY_MS, codec.H_REDELIVERIES, codec.H_SEQ, codec.H_KEY})


@dataclass(frozen=True)
class Parked:
    """One parked message as found in the queue."""

    position: int
    """1-based place in the parking queue when it was read."""
    key: str | None
    """The item key (``None`` when the message does not say)."""
    reason: str
    """A ``codec.PARK_*`` value, or ``broker:<x-death reason>`` when the broker dead-lettered it."""
    error: str
    attempt: int
    """Failures counted before it was parked."""
    parked_at: float | None
    """Wall-clock seconds when it was parked."""
    parked_from: str | None
    """The partition queue it was parked from."""
    body: bytes
    headers: dict[str, Any]
    props: Any
    """The parked message's AMQP properties (a replay keeps them, ``pool.copies``)."""
    tag: int

    @property
    def size(self) -> int:
        return len(self.body)

    def as_dict(self, *, body: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "position": self.position, "key": self.key, "reason": self.reason, "error": self.error,
            "attempt": self.attempt, "parked_at": iso_time(self.parked_at), "parked_from": self.parked_from,
            "size": self.size,
        }
        if body:
            out["headers"] = {k: _plain(v) for k, v in self.headers.items()}
            out["content_type"] = self.props.content_type
            try:
                out["body"] = self.body.decode()
            except UnicodeDecodeError:
                out["body_hex"] = self.body.hex()
        return out


@dataclass(frozen=True)
class Selection:
    """Which parked messages a command acts on: all filters must match; at most ``limit`` of them."""

    key: str | None = None
    reason: str | None = None
    limit: int | None = None

    def pick(self, items: list[Parked]) -> list[Parked]:
        chosen = [p for p in items if (self.key is None or p.key == self.key)
                  and (self.reason is None or p.reason == self.reason)]
        return chosen if self.limit is None else chosen[: self.limit]

    def describe(self) -> str:
        parts = [f"key={self.key}" if self.key is not None else "", f"reason={self.reason}" if self.reason else ""]
        return " ".join(p for p in parts if p) or "all"


def iso_time(t: float | None) -> str | None:
    if t is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


def _text(v: Any) -> str | None:
    if isinstance(v, bytes):
        return v.decode(errors="replace")
    return None if v is None else str(v)


def _plain(v: Any) -> Any:
    """Header values as JSON can show them (pika gives bytes, datetimes, nested tables)."""
    if isinstance(v, bytes):
        return v.decode(errors="replace")
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_plain(x) for x in v]
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)


def describe(position: int, tag: int, routing_key: str, props: Any, body: bytes, parked_queue: str) -> Parked:
    """A ``Parked`` from a delivery of the parking queue."""
    headers = dict(props.headers or {})
    deaths = headers.get("x-death") or []
    first_death = deaths[0] if deaths and isinstance(deaths[0], dict) else {}
    key = _text(headers.get(codec.H_KEY))
    if not key:
        keys = first_death.get("routing-keys") or []
        key = _text(keys[0]) if keys else (routing_key if routing_key != parked_queue else None)
    reason = _text(headers.get(codec.H_REASON))
    error = _text(headers.get(codec.H_ERROR)) or ""
    parked_from = _text(headers.get(codec.H_PARKED_FROM)) or _text(first_death.get("queue"))
    if reason is None:
        reason = f"broker:{_text(first_death.get('reason')) or 'unknown'}"
        error = broker_error(reason, first_death, parked_from, parked_queue)
    parked_ms = headers.get(codec.H_PARKED_MS)
    attempt = headers.get(codec.H_ATTEMPT, 0)
    return Parked(
        position=position, key=key, reason=reason, error=error,
        attempt=attempt if isinstance(attempt, int) else 0,
        parked_at=parked_ms / 1000 if isinstance(parked_ms, int) else None,
        parked_from=parked_from, body=body, headers=headers, props=props, tag=tag,
    )


def broker_error(reason: str, death: dict[str, Any], queue: str | None, parked_queue: str) -> str:
    """What a message the broker dead-lettered (no error text of ours) went through, and what to do."""
    controller = parked_queue.rsplit(".", 2)[-2] if parked_queue.count(".") >= 2 else "CONTROLLER"
    replay = f"ctlpool parked replay {controller} --reason {reason}"
    if reason == "broker:expired":
        ttl = _text(death.get("original-expiration")) or "?"
        return (f"the publisher set a per-message expiration ({ttl} ms) and it ran out while the event waited in "
                f"{queue or 'its partition'}: the broker dead-lettered a healthy event. ctlpool never sets one; "
                f"publish without the 'expiration' property, and bring these back with: {replay} (a replay drops "
                "it)")
    if reason == "broker:delivery_limit":
        return (f"delivered by {queue or 'its partition'} as often as its x-delivery-limit allows without an ack: "
                "it kept killing (or stalling) the workers that took it before they could park it. Fix the "
                f"reconcile, then: {replay}")
    return f"dead-lettered by the broker from {queue or 'a queue'} ({reason[len('broker:'):]})"


def replay_headers(headers: dict[str, Any]) -> dict[str, Any]:
    """What a replayed copy carries: the original headers less the broker's and the park's."""
    return {k: v for k, v in codec.clean_headers(headers).items() if k not in PARK_HEADERS}


class ParkingLot:
    """A controller's parking queue, held open for one command (see the module docstring)."""

    def __init__(self, conn: Connection, prefix: str, controller: str) -> None:
        self.conn = conn
        self.names = Names(prefix, controller)
        self.queue = self.names.parked
        self.ready = 0
        """Messages in the queue when ``take`` started."""
        self._ch: Any = None
        self._tag: str | None = None
        self._pub: ConfirmChannel | None = None

    async def take(self) -> list[Parked]:
        """Hold every message that was ready (up to ``MAX_HELD``), in queue order, acking none."""
        ch = self._ch = await self.conn.channel()
        try:
            ok = await ch.rpc("queue_declare", queue=self.queue, passive=True)
        except ChannelGone as exc:
            if exc.reply_code == NOT_FOUND:
                raise ConfigError(f"no parking queue {self.queue}: is {self.names.controller!r} a controller "
                                  f"(and --prefix {self.names.prefix} right)?") from None
            raise
        self.ready = ok.method.message_count
        want = min(self.ready, MAX_HELD)
        if want == 0:
            return []
        await ch.rpc("basic_qos", prefetch_count=want)
        got: list[Parked] = []
        arrived = asyncio.Event()

        def on_message(_c: Any, method: Any, props: Any, body: bytes) -> None:
            got.append(describe(len(got) + 1, method.delivery_tag, method.routing_key, props, body, self.queue))
            arrived.set()

        self._tag = await ch.consume(self.queue, on_message)
        while len(got) < want:
            arrived.clear()
            try:
                await asyncio.wait_for(arrived.wait(), IDLE_S)
            except asyncio.TimeoutError:
                break
        return got[:want]

    async def replay(self, items: list[Parked]) -> list[tuple[Parked, str]]:
        """Publish each through the exchange; ack its parked copy once confirmed. Returns the failures."""
        failed: list[tuple[Parked, str]] = []
        sendable = []
        for p in items:
            if p.key is None:
                failed.append((p, f"item key unknown (no {codec.H_KEY} header): cannot route it"))
            else:
                sendable.append(p)
        if not sendable:
            return failed
        await self._check_exchange()
        if self._pub is None:
            self._pub = await self.conn.confirm_channel()
        futures = []
        for p in sendable:
            headers = replay_headers(p.headers)
            try:
                props = copies.fit(copies.properties(p.props, headers), self._pub.frame_max)
            except copies.FrameTooLarge as exc:
                futures.append(self._failed(PublishError(str(exc))))
                continue
            futures.append(self._pub.publish(self.names.exchange, p.key or "", p.body, headers, props))
        results = await asyncio.gather(*futures, return_exceptions=True)
        for p, r in zip(sendable, results):
            if isinstance(r, BaseException):
                failed.append((p, str(r) if isinstance(r, (PublishError, ChannelGone)) else repr(r)))
            elif self._ch.is_open:
                self._ch.raw.basic_ack(p.tag)
            else:
                failed.append((p, "the parking queue's channel closed before the ack; the parked copy stays"))
        failed.sort(key=lambda f: f[0].position)
        return failed

    @staticmethod
    def _failed(exc: BaseException) -> asyncio.Future[None]:
        f: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        f.set_exception(exc)
        return f

    def remove(self, items: list[Parked]) -> None:
        """Delete them from the parking queue (ack)."""
        for p in items:
            self._ch.raw.basic_ack(p.tag)

    async def close(self) -> None:
        """Stop consuming, put back every message still held (in order), close the channels."""
        ch = self._ch
        if ch is not None and ch.is_open:
            if self._tag is not None:
                await ch.rpc("basic_cancel", consumer_tag=self._tag)
                # everything delivered and not acked goes back, keeping its place
                ch.raw.basic_nack(delivery_tag=0, multiple=True, requeue=True)
            await ch.close()
        if self._pub is not None:
            await self._pub.ch.close()

    async def _check_exchange(self) -> None:
        """A publish to a missing exchange closes the channel with 404: say it plainly instead."""
        if not await self.conn.exists("exchange", self.names.exchange):
            raise ConfigError(f"exchange {self.names.exchange} does not exist; start the pool or run "
                              f"'ctlpool topology {self.names.controller}' first")


@dataclass
class Outcome:
    """What a ``parked`` command found and did."""

    queue: str
    ready: int
    matched: list[Parked]
    done: int = 0
    failed: list[tuple[Parked, str]] | None = None
    declined: bool = False


async def run(conn: Connection, prefix: str, controller: str, action: str, selection: Selection,
              confirm: Callable[[list[Parked]], Awaitable[bool]] | None = None) -> Outcome:
    """Do ``action`` (list, show, replay, purge) on the selected parked messages of ``controller``.

    ``confirm`` is asked before a purge with the messages it would remove; False leaves them.
    """
    lot = ParkingLot(conn, prefix, controller)
    try:
        held = await lot.take()
        chosen = selection.pick(held)
        out = Outcome(lot.queue, lot.ready, chosen)
        if action == "replay" and chosen:
            out.failed = await lot.replay(chosen)
            out.done = len(chosen) - len(out.failed)
        elif action == "purge" and chosen:
            if confirm is not None and not await confirm(chosen):
                out.declined = True
            else:
                lot.remove(chosen)
                out.done = len(chosen)
        return out
    finally:
        await lot.close()
