"""A broker that lives in the test: fake connections, channels and a confirm channel for the
worker's rooms, recording every publish, confirm, ack, nack and close in one ordered log.

The rooms are built by ``Worker._build`` exactly as in production; only the session's
connections are replaced. Confirms are given by the test (``Wire.confirm``), so a test decides
when the broker answers and checks what the worker did before and after.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any, Callable

import pika

from pool.controller import Controller
from pool.fence import Lease
from pool.settings import resolve
from pool.worker import Worker
from pool.worker.parts import Partition


class Wire:
    """The ordered log of what the worker sent, and the confirms it waits for."""

    def __init__(self, auto_confirm: bool = False) -> None:
        self.auto_confirm = auto_confirm  # the broker confirms each publish on the next loop turn
        self.log: list[tuple[Any, ...]] = []
        self.pending: dict[int, asyncio.Future[None]] = {}
        self.published: list[SimpleNamespace] = []

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
        self.wire.published.append(SimpleNamespace(seq=seq, exchange=exchange, key=key, body=body, headers=headers,
                                                   props=props))
        self.wire.log.append(("publish", seq, exchange, key))
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.wire.pending[seq] = fut
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

    def basic_publish(self, exchange: str, key: str, body: bytes) -> None:
        pass  # member heartbeats


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

    async def rpc(self, method: str, /, **kwargs: Any) -> Any:
        self.conn.wire.log.append(("rpc", method, kwargs.get("queue") or kwargs.get("exchange")))
        answer = self.conn.answers.get(method)
        if isinstance(answer, asyncio.Future):
            return await answer
        return answer

    async def consume(self, queue: str, on_message: Callable[..., None], *, exclusive: bool = False,
                      auto_ack: bool = False, consumer_tag: str | None = None) -> None:
        self.queue, self.on_message = queue, on_message

    async def close(self) -> None:
        self.conn.wire.log.append(("close", self.queue))
        self.is_open = False

    def deliver(self, tag: int, key: str | bytes, body: bytes = b'{"n": 1}', headers: dict[str, Any] | None = None,
                redelivered: bool = False, exchange: str | None = None, properties: dict[str, Any] | None = None) -> None:
        """The broker delivers a message on this channel's consumer (through the controller's
        exchange unless ``exchange`` says otherwise)."""
        assert self.on_message is not None
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


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Rig:
    """A worker's rooms wired as in production, bound to a fake session; run inside a loop."""

    def __init__(self, controller: Controller, *, clean: bool = True, auto_confirm: bool = False,
                 **flags: Any) -> None:
        self.clock = Clock()
        settings = resolve({"node-id": "n1", "partitions": 4, "prefetch": 10, **flags}, env={})
        self.worker = Worker(settings=settings, controllers=[controller], clock=self.clock, wall=lambda: 1.7e9,
                             rand=lambda: 0.5)
        self.wire = Wire(auto_confirm)
        self.conn = FakeConnection(self.wire, clean)
        self.session = FakeSession(self.wire, self.conn, self.clock)
        self.settler, self.intake, self.dispatch, self.ownership = self.worker._build(asyncio.get_running_loop())
        self.settler.pub = self.session.pub  # type: ignore[assignment]
        self.dispatch.lease, self.dispatch.running = self.session.lease, True
        self.dispatch.conn = self.conn  # type: ignore[assignment]
        self.ownership.bind(self.session)  # type: ignore[arg-type]
        self.ctl = self.worker.ctls[0]

    async def partition(self, index: int = 0) -> tuple[Partition, FakeChannel]:
        """Acquire ``index`` through ``Ownership`` (the fake broker grants it at once)."""
        await self.ownership.acquire(self.ctl, index)
        part = self.ownership.parts[(0, index)]
        return part, part.ch  # type: ignore[return-value]


async def turns(n: int = 50) -> None:
    """Let the loop run every callback that is ready, ``n`` times over (nothing here waits on time)."""
    for _ in range(n):
        await asyncio.sleep(0)


async def until(cond: Callable[[], bool], what: str, n: int = 500) -> None:
    for _ in range(n):
        if cond():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"never happened: {what}")
