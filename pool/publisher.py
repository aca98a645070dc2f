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
import time
from typing import Any, AsyncIterable, Iterable

from .amqp import ConfirmChannel, Connection, connect
from .codec import H_FIRST_MS, encode
from .settings import DEFAULT_AMQP_URL

# Unconfirmed messages in flight in ``publish_many``: enough to hide the confirm round
# trip (~20k msg/s in DESIGN fact 9), small enough that a failure re-sends little.
DEFAULT_WINDOW = 1000


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
    ) -> int:
        """Pipeline (controller, key, payload) triples; ``raw`` payloads are bytes already. Returns the count.

        Raises on the first failed confirm, after waiting for the rest in flight.
        """
        inflight: set[asyncio.Future[None]] = set()
        sent = 0

        async def settle(limit: int) -> None:
            nonlocal inflight
            while len(inflight) > limit:
                done, inflight = await asyncio.wait(inflight, return_when=asyncio.FIRST_COMPLETED)
                failed = [exc for f in done if (exc := f.exception()) is not None]  # each retrieved
                if failed:
                    if inflight:
                        await asyncio.wait(inflight)
                        for g in inflight:
                            g.exception()
                    raise failed[0]

        async def items() -> AsyncIterable[tuple[str, str, Any]]:
            if hasattr(events, "__aiter__"):
                async for e in events:  # type: ignore[union-attr]
                    yield e
            else:
                for e in events:  # type: ignore[union-attr]
                    yield e

        async for controller, key, payload in items():
            inflight.add(self._send(controller, key, payload, raw=raw))
            sent += 1
            if len(inflight) >= window:
                await settle(window // 2)
        await settle(0)
        return sent


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
