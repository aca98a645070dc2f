"""An in-memory broker for the worker's rooms: fake connections, channels and a confirm channel,
recording every publish, confirm, ack, nack and close in one ordered log (``Wire``).

The rooms are built by ``pool.worker.Worker._build`` exactly as in production; only the
session's connections are these. ``pool.testing.Harness`` routes what is published here the way
RabbitMQ would (to controllers, delay tiers, parking); the worker's own unit tests drive the same
fakes by hand, deciding when the broker confirms (``Wire.confirm``) and checking what the worker
did before and after.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any, Callable

import pika

from ..fence import Lease


class Wire:
    """The ordered log of what the worker sent, and the confirms it waits for."""

    def __init__(self, auto_confirm: bool = False) -> None:
        self.auto_confirm = auto_confirm  # the broker confirms each publish on the next loop turn
        self.log: list[tuple[Any, ...]] = []
        self.pending: dict[int, asyncio.Future[None]] = {}
        self.published: list[SimpleNamespace] = []
        self.on_publish: Callable[[SimpleNamespace], None] = lambda p: None  # a router (``Harness``)

    def acks(self, before: int | None = None) -> list[tuple[int, bool]]:
        """Ack frames sent, as (tag, multiple); ``before``: only those logged before that index."""
        return [(e[1], e[2]) for e in self.log[:before] if e[0] == "ack"]

    def acked_tags(self, before: int | None = None) -> list[int]:
        """The tags the ack frames name (a multiple ack: every tag up to it not acked before)."""
        tags: list[int] = []
        for acked, multiple in self.acks(before):
            tags += [t for t in range(1, acked + 1) if t not in tags] if multiple else [acked]
        return tags

    def confirm(self, seq: int | None = None) -> None:
        """The broker confirms publish ``seq`` (default: all unconfirmed)."""
        for s in ([seq] if seq is not None else sorted(self.pending)):
            self.log.append(("confirm", s))
            fut = self.pending.pop(s)
            if not fut.done():  # a publish whose awaiting reconcile was cancelled (as ConfirmChannel does)
                fut.set_result(None)

    def index(self, *event: Any) -> int:
        return self.log.index(event)


class FakeConfirmChannel:
    frame_max = 131072  # RabbitMQ's default

    def __init__(self, wire: Wire) -> None:
        self.wire = wire
        self.ch = SimpleNamespace(closed=asyncio.get_running_loop().create_future())

    def publish(self, exchange: str, key: str, body: bytes, headers: Any = None, props: Any = None) -> asyncio.Future[None]:
        seq = len(self.wire.published) + 1
        sent = SimpleNamespace(seq=seq, exchange=exchange, key=key, body=body, headers=headers, props=props)
        self.wire.published.append(sent)
        self.wire.log.append(("publish", seq, exchange, key))
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.wire.pending[seq] = fut
        self.wire.on_publish(sent)
        if self.wire.auto_confirm:
            asyncio.get_running_loop().call_soon(self.wire.confirm, seq)
        return fut


class FakeRaw:
    def __init__(self, wire: Wire, name: str) -> None:
        self.wire = wire
        self.name = name

    def basic_ack(self, tag: int, multiple: bool = False) -> None:
        self.wire.log.append(("ack", tag, multiple))

    def basic_nack(self, tag: int, multiple: bool = False, requeue: bool = True) -> None:
        self.wire.log.append(("nack", tag))

    def basic_publish(self, exchange: str, key: str, body: bytes, props: Any = None) -> None:
        pass  # member heartbeats and notices


class FakeChannel:
    """A channel: ``rpc`` answers from ``conn.answers`` (a value, or a future the test resolves)."""

    def __init__(self, conn: "FakeConnection", n: int) -> None:
        loop = asyncio.get_running_loop()
        self.conn = conn
        self.raw = FakeRaw(conn.wire, f"ch{n}")
        self.is_open = True
        self.closed: asyncio.Future[Any] = loop.create_future()
        self.cancelled: asyncio.Future[Any] = loop.create_future()
        self.on_message: Callable[..., None] | None = None
        self.queue = ""
        self.tags = 0

    async def rpc(self, method: str, /, **kwargs: Any) -> Any:
        self.conn.wire.log.append(("rpc", method, kwargs.get("queue") or kwargs.get("exchange")))
        answer = self.conn.answers.get(method)
        if isinstance(answer, asyncio.Future):
            return await answer
        return answer

    async def consume(self, queue: str, on_message: Callable[..., None], *, exclusive: bool = False,
                      auto_ack: bool = False, consumer_tag: str | None = None) -> None:
        self.queue, self.on_message = queue, on_message
        self.conn.consumers[queue] = self

    async def close(self) -> None:
        self.conn.wire.log.append(("close", self.queue))
        self.is_open = False

    def deliver(self, tag: int | None, key: str | bytes, body: bytes = b'{"n": 1}',
                headers: dict[str, Any] | None = None, redelivered: bool = False, exchange: str | None = None,
                properties: dict[str, Any] | None = None) -> None:
        """The broker delivers a message on this channel's consumer (through the controller's
        exchange unless ``exchange`` says otherwise); ``tag`` None: the channel's next one."""
        assert self.on_message is not None
        if tag is None:
            self.tags += 1
            tag = self.tags
        method = SimpleNamespace(delivery_tag=tag, routing_key=key, redelivered=redelivered,
                                 exchange=self.queue.rsplit(".", 1)[0] if exchange is None else exchange)
        props = pika.BasicProperties(headers=headers, content_type="application/json", **(properties or {}))
        self.on_message(self, method, props, body)


class FakeConnection:
    def __init__(self, wire: Wire, clean: bool = True) -> None:
        self.wire = wire
        self.clean = clean  # whether every partition's clean marker exists
        self.closed: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.channels: list[FakeChannel] = []
        self.consumers: dict[str, FakeChannel] = {}  # queue -> the channel consuming it
        self.answers: dict[str, Any] = {}
        self.blocked = None
        self.address = "127.0.0.1:5672"

    async def channel(self) -> FakeChannel:
        ch = FakeChannel(self, len(self.channels))
        self.channels.append(ch)
        return ch

    async def exists(self, kind: str, name: str) -> bool:
        return self.clean


class FakeSession:
    def __init__(self, wire: Wire, conn: FakeConnection, clock: Callable[[], float]) -> None:
        loop = asyncio.get_running_loop()
        self.consume = conn
        self.publish = conn
        self.pub = FakeConfirmChannel(wire)
        self.heartbeats = FakeChannel(conn, -1)
        self.lease = Lease(clock, 1e9)
        self.lost: asyncio.Future[Any] = loop.create_future()

    def lose(self, why: str) -> None:
        if not self.lost.done():
            self.lost.set_result(why)
