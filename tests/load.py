"""Load generation and the accounting every reliability test applies.

``Load`` publishes from a thread at a steady rate, half to a few hot keys and half to
fresh cold keys (one event each), and survives broker restarts: a batch whose confirms
failed is published again after reconnecting (duplicates are fine, loss is not). Only
confirmed events are counted as published.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from tests.helpers import queue_depth

PARTITIONS = 8
DEFAULT_TIERS = (1, 4, 16, 64, 256, 1024)


def backlog(url: str, prefix: str, controller: str = "rec", tiers: tuple[int, ...] = DEFAULT_TIERS,
            partitions: int = PARTITIONS) -> int:
    """Ready messages in a controller's partitions and delay tiers."""
    queues = [f"{prefix}.{controller}.p{i:03d}" for i in range(partitions)]
    queues += [f"{prefix}.{controller}.delay.{t}s" for t in tiers]
    return sum(queue_depth(url, q) for q in queues)


def ok_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r["r"] == "ok"]


def assert_none_lost(records: list[dict[str, Any]], per_key: dict[str, int]) -> None:
    """Each cold key (one event) reconciled successfully; each hot key's successful reconciles
    covered at least as many deliveries as events were published for it. For loads that span a
    handover: order across one is not kept, so a key's last reconcile may see event N-1 after a
    coalesced one covered N, and ``assert_latest_reconciled`` would fail without a loss."""
    ok = ok_records(records)
    seen_cold = {r["k"] for r in ok if r["k"].startswith("cold")}
    cold = {k for k in per_key if k.startswith("cold")}
    missing = cold - seen_cold
    assert not missing, f"{len(missing)} cold keys never reconciled, e.g. {sorted(missing)[:5]}"
    for key in per_key:
        if key.startswith("hot"):
            covered = sum(r["c"] for r in ok if r["k"] == key)
            assert covered >= per_key[key], f"{key}: {covered} deliveries covered < {per_key[key]} published"


def assert_latest_reconciled(records: list[dict[str, Any]], per_key: dict[str, int]) -> None:
    """Per key, the highest event number reconciled successfully is the number published: the
    last event of every key was reconciled (redelivered duplicates can't stand in for it)."""
    latest: dict[str, int] = {}
    for r in ok_records(records):
        latest[r["k"]] = max(latest.get(r["k"], 0), r["n"])
    behind = {k: (latest.get(k, 0), n) for k, n in per_key.items() if latest.get(k, 0) != n}
    assert not behind, f"{len(behind)} keys' last event not reconciled (seen, published): {list(behind.items())[:10]}"


class Load:
    """Publishes events at ``rate``/s from a thread until the ``with`` block ends."""

    def __init__(self, url: str, prefix: str, controller: str = "rec", rate: int = 1000, hot: int = 10,
                 sleep_ms: int = 1, tag: str = "", cold: bool = True) -> None:
        self.url, self.prefix, self.controller = url, prefix, controller
        self.rate, self.hot, self.sleep_ms = rate, hot, sleep_ms
        self.with_cold = cold  # False: every event is for one of the hot keys
        self.tag = tag  # appended to every key: two loads on one controller keep their own keys
        self.stop = threading.Event()
        self.per_key: dict[str, int] = {}
        self.cold = 0
        self.turn = 0  # hot keys in turn
        self.retried_batches = 0
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _batch(self, size: int) -> tuple[list[tuple[str, str, Any]], dict[str, int]]:
        counts = dict(self.per_key)
        events = []
        now = time.time()
        for i in range(size):
            if i % 2 or not self.with_cold:
                self.turn += 1
                key = f"hot{self.turn % self.hot}{self.tag}"
            else:
                self.cold += 1
                key = f"cold{self.cold}{self.tag}"
            counts[key] = counts.get(key, 0) + 1
            events.append((self.controller, key, {"n": counts[key], "sleep_ms": self.sleep_ms, "t": now}))
        return events, counts

    def _run(self) -> None:
        from pool.errors import BrokerError
        from pool.amqp import ChannelGone
        from pool.publisher import Publisher

        async def go() -> None:
            size = max(self.rate // 20, 1)
            pub: Publisher | None = None
            pending: tuple[list[tuple[str, str, Any]], dict[str, int]] | None = None
            while not self.stop.is_set() or pending is not None:
                t = time.monotonic()
                try:
                    if pub is None:
                        pub = Publisher(self.url, prefix=self.prefix)
                        await pub.connect()
                    if pending is None:
                        pending = self._batch(size)
                    await pub.publish_many(pending[0])
                    self.per_key = pending[1]
                    pending = None
                except (BrokerError, ChannelGone, OSError):
                    self.retried_batches += 1
                    if pub is not None:
                        await pub.close()
                    pub = None
                    await asyncio.sleep(0.5)
                    continue
                await asyncio.sleep(max(0.0, 0.05 - (time.monotonic() - t)))
            if pub is not None:
                await pub.close()

        try:
            asyncio.run(go())
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def __enter__(self) -> "Load":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join(60)
        assert self.error is None, self.error

    @property
    def published(self) -> int:
        return sum(self.per_key.values())

    def flow(self, events: int, timeout: float = 60) -> None:
        """Wait until ``events`` more events have been published (and confirmed) under this load:
        the pool works under load for a while, measured in events, not seconds."""
        from tests.helpers import wait_until

        target = self.published + events
        wait_until(lambda: self.published >= target or self.error is not None, timeout,
                   what=f"{events} more events published")
        assert self.error is None, self.error
