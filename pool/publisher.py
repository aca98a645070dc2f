"""Sending events to controllers from outside the pool: ``Publisher`` (async) and ``BlockingPublisher``.

Every publish is persistent, mandatory and confirmed: ``publish`` returns once the broker
has the event, and raises ``Unroutable`` / ``Nacked`` / ``ChannelGone`` otherwise, never
silently. ``publish_many`` pipelines up to ``window`` unconfirmed messages for load.
``BlockingPublisher`` runs the same code on a private event loop for synchronous callers.

When the broker blocks the connection (a memory or disk alarm: ``connection.blocked``),
publishes wait, unconfirmed, until it unblocks; the publisher logs one warning when that
starts, with the broker's reason, and one when it ends (``pool.amqp.Connection``), so a
caller that seems to hang says why.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, AsyncIterable, Iterable

from .amqp import ChannelGone, ConfirmChannel, Connection, connect
from .errors import BrokerUnavailable, Nacked
from .codec import H_FIRST_MS, encode
from .settings import DEFAULT_AMQP_URL

log = logging.getLogger("ctlpool.publisher")

# Unconfirmed messages in flight in ``publish_many``: enough to hide the confirm round
# trip (~20k msg/s in DESIGN fact 9), small enough that a failure re-sends little.
DEFAULT_WINDOW = 1000
RETRY_FIRST_S = 0.5  # publish_many(retry_s=...): a nacked batch is sent again after this, doubling...
RETRY_MAX_S = 5.0  # ...up to this


class Publisher:
    """Async publisher on its own connection: ``async with Publisher(url) as pub: await pub.publish(...)``."""

    def __init__(self, amqp_url: str = DEFAULT_AMQP_URL, *, prefix: str = "ctl", name: str = "ctlpool-publisher") -> None:
        self.amqp_url = amqp_url
        self.prefix = prefix
        self.name = name
        self._conn: Connection | None = None
        self._ch: ConfirmChannel | None = None

    async def connect(self) -> None:
        self._conn = await connect(self.amqp_url, name=self.name)  # it logs a block by the broker, and its end
        self._ch = await self._conn.confirm_channel()

    async def __aenter__(self) -> "Publisher":
        await self.connect()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        await asyncio.sleep(0)

    def _send(self, controller: str, key: str, payload: Any, raw: bool = False) -> asyncio.Future[None]:
        if self._ch is None:
            raise RuntimeError("Publisher is not connected; use 'async with' or await connect()")
        body = payload if raw else encode(payload)
        return self._ch.publish(f"{self.prefix}.{controller}", key, body, {H_FIRST_MS: int(time.time() * 1000)})

    async def publish(self, controller: str, key: str, payload: Any = None) -> None:
        """Send one event and wait for the broker's confirm."""
        await self._send(controller, key, {} if payload is None else payload)

    async def publish_many(
        self,
        events: Iterable[tuple[str, str, Any]] | AsyncIterable[tuple[str, str, Any]],
        *,
        window: int = DEFAULT_WINDOW,
        raw: bool = False,
        retry_s: float = 0.0,
    ) -> int:
        """Pipeline (controller, key, payload) triples; ``raw`` payloads are bytes already. Returns the count.

        Raises on the first failed confirm, after waiting for the rest in flight; an error
        raised by ``events`` itself (bad input) is raised once everything sent before it is
        confirmed, so the caller knows all before it got in. With
        ``retry_s`` > 0, a lost connection (its node died, a flap) or a nack (a quorum queue
        without a leader for a moment) is not a failure while the broker confirmed something
        within the last ``retry_s``: the publisher reconnects, to the next node of a cluster's
        list first, and sends again every event not confirmed (at least once: one the broker
        took just before the loss comes twice), nacked ones after a backoff.
        """
        pending: dict[asyncio.Future[None], tuple[int, tuple[str, str, Any]]] = {}  # -> (order sent, event)
        sent = 0
        progress = time.monotonic()  # of the last confirm
        backoff = RETRY_FIRST_S

        def send(n: int, item: tuple[str, str, Any]) -> None:
            pending[self._send(*item, raw=raw)] = (n, item)

        async def settle(limit: int) -> None:
            nonlocal progress, backoff
            while len(pending) > limit:
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                outcomes = [(f.exception(), pending.pop(f)) for f in done]  # each exception retrieved
                failed = [(exc, sent_as) for exc, sent_as in outcomes if exc is not None]
                if len(failed) < len(outcomes):
                    progress, backoff = time.monotonic(), RETRY_FIRST_S
                if not failed:
                    continue
                if pending:  # the rest in flight: confirmed, or lost with the same connection
                    await asyncio.wait(pending)
                    failed += [(exc, sent_as) for f, sent_as in pending.items() if (exc := f.exception()) is not None]
                    pending.clear()
                refused = [exc for exc, _ in failed if not isinstance(exc, (ChannelGone, Nacked))]
                if refused or time.monotonic() - progress > retry_s:
                    raise (refused or [failed[0][0]])[0]
                await recover(failed)
                for _exc, (n, item) in sorted(failed, key=lambda f: f[1][0]):  # in the order first sent
                    send(n, item)

        async def recover(failed: list[tuple[BaseException, tuple[int, Any]]]) -> None:
            nonlocal backoff
            if not any(isinstance(exc, ChannelGone) for exc, _ in failed):
                # Seen on 3.10 after a node died: a channel whose queue client still points at
                # a dead leader may nack the same queues until it is closed; so a new one each time.
                log.warning("the broker refused %d events (%s); re-sending them in %.1fs over a new connection",
                            len(failed), failed[0][0], backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, RETRY_MAX_S)
            else:
                log.warning("connection lost (%s); re-sending %d unconfirmed events over a new connection",
                            failed[0][0], len(failed))
            await self.close()
            while True:
                try:
                    await self.connect()
                    return
                except BrokerUnavailable:
                    if time.monotonic() - progress > retry_s:
                        raise
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, RETRY_MAX_S)

        async def items() -> AsyncIterable[tuple[str, str, Any]]:
            if hasattr(events, "__aiter__"):
                async for e in events:  # type: ignore[union-attr]
                    yield e
            else:
                for e in events:  # type: ignore[union-attr]
                    yield e

        source = items().__aiter__()
        try:
            while True:
                try:
                    item = await source.__anext__()
                except StopAsyncIteration:
                    break
                except Exception:
                    await settle(0)  # bad input: what was sent before it is confirmed (or fails) first
                    raise
                send(sent, item)
                sent += 1
                if len(pending) >= window:
                    await settle(window // 2)
            await settle(0)
        finally:
            for f in pending:  # left by a cancel, or by an error raised above: that error is the answer
                f.add_done_callback(_retrieve)
        return sent


def _retrieve(f: asyncio.Future[None]) -> None:
    if not f.cancelled():
        f.exception()


class BlockingPublisher:
    """Synchronous wrapper: ``with BlockingPublisher(url) as pub: pub.publish("c", "k", {...})``."""

    def __init__(self, amqp_url: str = DEFAULT_AMQP_URL, *, prefix: str = "ctl") -> None:
        self._loop = asyncio.new_event_loop()
        self._pub = Publisher(amqp_url, prefix=prefix)
        self._loop.run_until_complete(self._pub.connect())

    def publish(self, controller: str, key: str, payload: Any = None) -> None:
        self._loop.run_until_complete(self._pub.publish(controller, key, payload))

    def publish_many(self, events: Iterable[tuple[str, str, Any]], *, window: int = DEFAULT_WINDOW) -> int:
        return self._loop.run_until_complete(self._pub.publish_many(events, window=window))

    def close(self) -> None:
        if not self._loop.is_closed():
            self._loop.run_until_complete(self._pub.close())
            self._loop.close()

    def __enter__(self) -> "BlockingPublisher":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
