"""Awaitable wrappers over pika's asyncio adapter: connections, channels, confirmed publishing.

Data flow: ``connect`` opens a pika ``AsyncioConnection`` on the running loop and
resolves when it is open (or raises ``BrokerUnavailable`` / ``PluginMissing``); its parameters, TLS
included, come from ``pool.tls``.
``Channel`` turns pika's callback RPCs into awaitables that fail with
``ChannelGone`` when the channel or connection closes under them.
``ConfirmChannel.publish`` puts a message on the wire at once and returns a future
that resolves on the broker's ack, or fails with ``Unroutable`` (basic.return, then
ack; DESIGN fact 5) or ``Nacked``; so callers pipeline many publishes and await all.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import Any, Callable

import pika
import pika.exceptions
from pika.adapters.asyncio_connection import AsyncioConnection

from . import frames, wire
from .codec import CONTENT_TYPE, H_SEQ
from .errors import BrokerUnavailable, Nacked, PluginMissing, PublishError, Unroutable
from .tls import url_parameters
from .urls import nodes_for, redact_url

log = logging.getLogger("ctlpool.amqp")

PERSISTENT = 2  # AMQP delivery_mode for messages that survive a broker restart
NOT_FOUND = 404  # AMQP reply code: no such exchange or queue
CLOSE_GRACE_S = 2.0  # a connection the broker doesn't let us close (blocked by an alarm) is then aborted

frames.install()  # no header a foreign publisher can send takes a connection down


class ChannelGone(Exception):
    """The channel (or its connection) closed; ``reply_code`` is the AMQP code, 0 if unknown."""

    def __init__(self, reply_code: int, reply_text: str) -> None:
        super().__init__(f"{reply_code} {reply_text}")
        self.reply_code = reply_code
        self.reply_text = reply_text


def _gone(reason: BaseException) -> ChannelGone:
    if isinstance(reason, (pika.exceptions.ChannelClosed, pika.exceptions.ConnectionClosed)):
        return ChannelGone(reason.reply_code, reason.reply_text)
    return ChannelGone(0, str(reason) or type(reason).__name__)


def _root_cause(exc: BaseException) -> str:
    """pika wraps a refused socket in three layers of workflow errors; keep the innermost."""
    text = repr(exc)
    m = re.search(r"last exception - \w+: (.*?); first exception", text)
    return m.group(1) if m else text


class Connection:
    """An open pika connection; ``closed`` resolves (with the reason) when it closes."""

    def __init__(self, raw: AsyncioConnection, closed: asyncio.Future[ChannelGone], name: str = "") -> None:
        self.raw = raw
        self.closed = closed
        self.name = name
        self.node = ""
        """The node's URL, redacted (logs)."""
        self.address = ""
        """The node's host:port (``ctlpool status`` shows it)."""
        self.dropped = False
        """Closed by the broker or the network, not by us."""
        self.move_on: Callable[[], None] = lambda: None
        """Make the process's next connect start at the next node of a cluster's list (``connect`` sets it)."""
        self.blocked: str | None = None
        """Why the broker blocks this connection's publishing (a memory or disk alarm); None when it doesn't."""
        self._blocked_at = 0.0
        raw.add_on_connection_blocked_callback(self._on_blocked)
        raw.add_on_connection_unblocked_callback(self._on_unblocked)

    def forsake(self) -> None:
        """The node went silent (paused, cut off, powered off: no TCP reset tells us): the
        process's next connect starts at the next node, at once (a close the node never answers
        takes a while), as if the broker had dropped this connection."""
        self.move_on()

    def _on_blocked(self, _raw: Any, frame: Any) -> None:
        self.blocked = frame.method.reason or "no reason given"
        self._blocked_at = time.monotonic()
        log.warning("broker blocked publishing: %s; waiting (memory or disk alarm on the broker)", self.blocked,
                    extra={"connection": self.name})

    def _on_unblocked(self, _raw: Any, _frame: Any) -> None:
        self.blocked = None
        log.warning("broker unblocked publishing after %.1fs; continuing", time.monotonic() - self._blocked_at,
                    extra={"connection": self.name})

    async def channel(self) -> "Channel":
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        try:
            self.raw.channel(on_open_callback=lambda ch: fut.done() or fut.set_result(ch))
        except pika.exceptions.AMQPError as exc:
            raise ChannelGone(0, f"connection not open: {exc!r}") from None
        ch = Channel(fut, self)
        await ch._ready()
        return ch

    async def confirm_channel(self) -> "ConfirmChannel":
        ch = await self.channel()
        conf = ConfirmChannel(ch)
        await conf._enable()
        return conf

    async def exists(self, kind: str, name: str) -> bool:
        """Whether exchange or queue (``kind``) ``name`` exists: a passive declare on a throwaway
        channel (a 404 closes the channel it came on, so never one in use)."""
        ch = await self.channel()
        try:
            await ch.rpc(f"{kind}_declare", **{kind: name}, passive=True)
            return True
        except ChannelGone as exc:
            if exc.reply_code == NOT_FOUND:
                return False
            raise
        finally:
            await ch.close()

    def close(self) -> None:
        """Close; if the broker has not confirmed within ``CLOSE_GRACE_S`` (it stops reading a
        connection it blocked for an alarm), drop the socket, so no consumer of ours lingers."""
        if self.raw.is_open:
            self.raw.close()
        if not self.closed.done():
            asyncio.get_running_loop().call_later(CLOSE_GRACE_S, self.abort)

    def abort(self) -> None:
        """Drop the socket now: the broker returns our unacked deliveries when it notices."""
        if not self.closed.done() and getattr(self.raw, "_transport", None) is not None:
            # pika's own abort path: it records why, then drops the socket and calls on_close
            # (aborting the transport directly trips pika's assertion that a reason was recorded)
            self.raw._terminate_stream(pika.exceptions.StreamLostError(
                f"aborted: the broker did not confirm the close within {CLOSE_GRACE_S:g}s"))

    @property
    def is_open(self) -> bool:
        return bool(self.raw.is_open)

    @property
    def heartbeat_s(self) -> int:
        """The heartbeat timeout negotiated with the broker (0: none)."""
        return int(self.raw.params.heartbeat or 0)

    def on_data(self, hook: Callable[[], None]) -> None:
        """Call ``hook()`` before pika sees each socket read (the worker's lease is renewed here)."""
        shim = self.raw._transport._protocol
        received = shim.data_received

        def data_received(data: bytes) -> None:
            hook()
            received(data)
        shim.data_received = data_received


async def connect(url: str, *, name: str, heartbeat_s: int = 20) -> Connection:
    """Open a connection to one node of ``url`` (one URL or a cluster's list, ``pool.urls``).

    The nodes are tried in this process's order (``urls.Nodes``): a refused connection moves on
    to the next at once; ``BrokerUnavailable`` only once every node failed, naming each. A
    connection the broker drops later moves the process's next connect on to the next node."""
    nodes = nodes_for(url)
    errors = []
    for node in nodes.order():
        try:
            conn = await _connect_node(node, name=name, heartbeat_s=heartbeat_s)
        except BrokerUnavailable as exc:
            nodes.failed(node)
            errors.append(str(exc))
            if len(nodes.urls) > 1:
                log.warning("%s; trying the next node", exc, extra={"connection": name})
            continue
        nodes.worked(node)
        conn.move_on = lambda node=node: nodes.failed(node)  # type: ignore[misc]
        conn.closed.add_done_callback(lambda f: conn.dropped and conn.move_on())
        return conn
    if len(errors) == 1:
        raise BrokerUnavailable(errors[0])
    raise BrokerUnavailable(f"no RabbitMQ node of {len(errors)} reachable: " + "; ".join(errors))


async def _connect_node(url: str, *, name: str, heartbeat_s: int) -> Connection:
    """Open a connection to one node; ``BrokerUnavailable`` says where and why when it fails (TLS: see ``use_tls``)."""
    loop = asyncio.get_running_loop()
    params = url_parameters(url)
    params.heartbeat = heartbeat_s
    params.client_properties = {"connection_name": name}
    params.connection_attempts = 1
    params.blocked_connection_timeout = None
    opened: asyncio.Future[None] = loop.create_future()
    closed: asyncio.Future[ChannelGone] = loop.create_future()

    def on_open(_c: Any) -> None:
        if not opened.done():
            opened.set_result(None)

    def on_open_error(_c: Any, exc: BaseException) -> None:
        if not opened.done():
            opened.set_exception(BrokerUnavailable(f"cannot connect to RabbitMQ at {redact_url(url)}: {_root_cause(exc)}"))

    def on_close(_c: Any, reason: BaseException) -> None:
        if not closed.done():
            conn.dropped = not isinstance(reason, pika.exceptions.ConnectionClosedByClient)
            closed.set_result(_gone(reason))
        if not opened.done():
            opened.set_exception(BrokerUnavailable(f"RabbitMQ at {redact_url(url)} closed the connection: {reason!r}"))

    raw = AsyncioConnection(params, on_open, on_open_error, on_close, custom_ioloop=loop)
    conn = Connection(raw, closed, name)  # tracks connection.blocked from the start
    conn.node = redact_url(url)
    conn.address = f"{params.host}:{params.port}"
    try:
        await opened
    except BaseException:
        if not raw.is_closed and not raw.is_closing:
            try:
                raw.close()
            except pika.exceptions.AMQPError:
                pass
        raise
    if not wire.coalesce(raw._transport, loop):  # one send per loop iteration, not one per frame
        _say_uncoalesced(type(raw._transport).__name__)
    return conn


_uncoalesced_said = False


def _say_uncoalesced(kind: str) -> None:
    """Once per process (not per connection): TLS transports send each frame on its own."""
    global _uncoalesced_said
    if not _uncoalesced_said:
        _uncoalesced_said = True
        log.info("frames are sent one by one on %s connections (pool.wire coalesces plaintext ones only)", kind)


class Channel:
    """A pika channel whose RPCs are awaitable."""

    def __init__(self, opening: asyncio.Future[Any], conn: Connection) -> None:
        self._opening = opening
        self.conn = conn
        self.raw: Any = None
        self._pending: set[asyncio.Future[Any]] = set()
        self._open = False
        self.closed: asyncio.Future[ChannelGone] = asyncio.get_running_loop().create_future()
        # the broker cancelled a consumer of this channel (its queue was deleted, ...)
        self.cancelled: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def _ready(self) -> None:
        waiter = asyncio.ensure_future(self._opening)
        done, _ = await asyncio.wait({waiter, self.conn.closed}, return_when=asyncio.FIRST_COMPLETED)
        if waiter not in done:
            waiter.cancel()
            raise self.conn.closed.result()
        self.raw = waiter.result()
        self._open = True
        self.raw.add_on_close_callback(self._on_close)
        self.raw.add_on_cancel_callback(self._on_cancel)
        self.conn.closed.add_done_callback(lambda f: self._fail_all(f.result()))

    def _on_cancel(self, frame: Any) -> None:
        if not self.cancelled.done():
            self.cancelled.set_result(frame.method.consumer_tag)

    def _on_close(self, _ch: Any, reason: BaseException) -> None:
        self._fail_all(_gone(reason))

    def _fail_all(self, exc: ChannelGone) -> None:
        self._open = False
        if not self.closed.done():
            self.closed.set_result(exc)
        for fut in self._pending:
            if not fut.done():
                fut.set_exception(exc)
        self._pending.clear()

    @property
    def is_open(self) -> bool:
        return self._open  # read on every ack: a flag, kept by _ready, close and _fail_all

    async def rpc(self, method: str, /, **kwargs: Any) -> Any:
        """Call ``raw.<method>(..., callback=...)`` and await its ok frame."""
        if self.closed.done():
            raise self.closed.result()
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.add(fut)
        try:
            getattr(self.raw, method)(callback=lambda frame: fut.done() or fut.set_result(frame), **kwargs)
        except pika.exceptions.AMQPError as exc:
            self._pending.discard(fut)
            raise ChannelGone(0, repr(exc)) from None
        try:
            return await fut
        finally:
            self._pending.discard(fut)

    async def consume(self, queue: str, on_message: Callable[..., None], *, exclusive: bool = False,
                      auto_ack: bool = False, consumer_tag: str | None = None) -> str:
        """Start consuming (manual acks unless ``auto_ack``); returns the consumer tag once the broker said ok."""
        if self.closed.done():
            raise self.closed.result()
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.add(fut)
        tag = self.raw.basic_consume(queue, on_message, auto_ack=auto_ack, exclusive=exclusive,
                                     consumer_tag=consumer_tag,
                                     callback=lambda frame: fut.done() or fut.set_result(frame))
        try:
            await fut
        finally:
            self._pending.discard(fut)
        return tag

    async def get(self, queue: str) -> tuple[int, bytes] | None:
        """``basic.get`` without auto-ack: (delivery tag, body), or None when the queue has nothing ready."""
        if self.closed.done():
            raise self.closed.result()
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.add(fut)
        self.raw.add_callback(lambda _frame: fut.done() or fut.set_result(None), [pika.spec.Basic.GetEmpty],
                              one_shot=True)
        self.raw.basic_get(queue, lambda _ch, method, _props, body: fut.done() or fut.set_result(
            (method.delivery_tag, body)), auto_ack=False)
        try:
            return await fut  # type: ignore[no-any-return]
        finally:
            self._pending.discard(fut)

    async def close(self) -> None:
        """Close the channel and wait until it is closed; unacked deliveries return to their queues."""
        if self.is_open:
            self._open = False
            try:
                self.raw.close()
            except pika.exceptions.AMQPError:
                return
        if self.raw is not None and not self.conn.closed.done():
            await asyncio.wait({self.closed, self.conn.closed}, return_when=asyncio.FIRST_COMPLETED)


class ConfirmChannel:
    """A channel in confirm mode; ``publish`` returns a future per message."""

    def __init__(self, ch: Channel) -> None:
        self.ch = ch
        self._seq = 0
        self._waiting: dict[int, asyncio.Future[None]] = {}
        self._returned: set[int] = set()

    async def _enable(self) -> None:
        self.ch.raw.add_on_return_callback(self._on_return)
        self.ch.closed.add_done_callback(self._on_closed)
        await self.ch.rpc("confirm_delivery", ack_nack_callback=self._on_confirm)

    @property
    def is_open(self) -> bool:
        return self.ch.is_open

    def publish(self, exchange: str, routing_key: str, body: bytes, headers: dict[str, Any] | None = None,
                properties: pika.BasicProperties | None = None) -> asyncio.Future[None]:
        """Send a persistent, mandatory message; the future resolves on confirm."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.ch.closed.done():
            fut.set_exception(self.ch.closed.result())
            return fut
        # The broker numbers what it received: the sequence advances only for a frame handed to
        # the connection, or every later confirm would be credited to the wrong publish.
        seq = self._seq + 1
        hdrs = dict(headers) if headers else {}
        hdrs[H_SEQ] = seq
        if properties is None:
            properties = pika.BasicProperties(content_type=CONTENT_TYPE, delivery_mode=PERSISTENT, headers=hdrs)
        else:
            properties.headers = hdrs
            properties.delivery_mode = PERSISTENT
        try:
            self.ch.raw.basic_publish(exchange, routing_key, body, properties, mandatory=True)
        except pika.exceptions.AMQPError as exc:  # channel or connection closing
            fut.set_exception(ChannelGone(0, repr(exc)))
            return fut
        except Exception as exc:  # noqa: BLE001 - pika marshals every frame before it writes any
            log.error("cannot encode a publish to %r (key %r): %s: %s", exchange, routing_key[:100],
                      type(exc).__name__, exc)
            fut.set_exception(PublishError(f"cannot encode the message: {type(exc).__name__}: {exc}"))
            return fut
        self._seq = seq
        self._waiting[seq] = fut
        return fut

    @property
    def frame_max(self) -> int:
        """The largest frame the broker accepts on this connection (negotiated at the handshake)."""
        return int(self.ch.conn.raw.params.frame_max)

    @property
    def unconfirmed(self) -> int:
        return len(self._waiting)

    @property
    def oldest_unconfirmed(self) -> int | None:
        """The sequence number of the oldest publish still waiting for its confirm."""
        return next(iter(self._waiting), None)

    def _on_return(self, _ch: Any, method: Any, properties: Any, _body: bytes) -> None:
        seq = (properties.headers or {}).get(H_SEQ)
        if isinstance(seq, int):
            self._returned.add(seq)

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        tag = method.delivery_tag
        nack = isinstance(method, pika.spec.Basic.Nack)
        if method.multiple:
            while self._waiting:
                first = next(iter(self._waiting))
                if first > tag:
                    break
                self._settle(first, nack)
        elif tag in self._waiting:
            self._settle(tag, nack)

    def _settle(self, seq: int, nack: bool) -> None:
        fut = self._waiting.pop(seq)
        if fut.done():
            return
        if seq in self._returned:
            self._returned.discard(seq)
            fut.set_exception(Unroutable(f"broker returned message #{seq}: no queue bound for it (312 NO_ROUTE)"))
        elif nack:
            fut.set_exception(Nacked(f"broker nacked message #{seq}"))
        else:
            fut.set_result(None)

    def _on_closed(self, f: asyncio.Future[ChannelGone]) -> None:
        exc = f.result()
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(exc)
        self._waiting.clear()


def is_plugin_missing(exc: BaseException) -> bool:
    text = str(exc)
    return "x-consistent-hash" in text and ("invalid exchange type" in text or "503" in text or "406" in text)


def plugin_error_or(exc: ChannelGone) -> BaseException:
    """``PluginMissing`` when a declare failed for lack of the plugin, else the error itself."""
    return PluginMissing() if is_plugin_missing(exc) else exc
