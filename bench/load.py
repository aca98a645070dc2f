"""Publisher processes: the load every scenario puts on the pool and on the floor alike.

Data flow: ``Publishers.start`` spawns ``load.publishers`` processes; each opens the real
``pool.publisher.Publisher`` (persistent, mandatory, confirmed), says "connected" on its
pipe and waits for ``go``. Then it sends its share of ``load.events`` through
``publish_many`` (pipelined confirms), as fast as confirms allow or paced to its share of
``load.rate``, writing how many it has sent into a shared counter (the progress line).
When every confirm is in, it sends back per-key counts and its first/last publish time.

Keys: publisher ``p`` of ``P`` owns key indexes ``r * P + p``, so each key's events come
from one process in order (``bench.records`` relies on that). Local rank ``r`` is taken in
turn (every key alike) or Zipf-distributed with exponent ``load.skew`` (rank 0 hottest).
Body: ``{"k": index, "n": sequence within the key, "t": time.monotonic_ns()}``.
"""

from __future__ import annotations

import asyncio
import bisect
import multiprocessing
import random
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterator

from .broker import Target
from .controllers import NAME

SPAWN = multiprocessing.get_context("spawn")  # children import what they need; no forked threads
COUNT_EVERY = 256  # events between updates of the shared progress counter
RETRY_S = 30.0  # publishers keep re-sending this long without a confirm (bench cluster kills a node mid-run)


@dataclass(frozen=True)
class Load:
    """What the publishers send."""

    events: int
    """Events in total, split evenly over the publishers."""
    publishers: int = 2
    """Publisher processes (one sends ~18-25k confirmed msg/s on the 2-core dev box, DESIGN fact 9)."""
    keys: int = 10_000
    """Distinct item keys."""
    rate: float | None = None
    """Events per second in total; ``None``: as fast as confirms allow."""
    skew: float | None = None
    """Zipf exponent of key popularity; ``None``: every key in turn."""
    preload: bool = False
    """Publish everything before the consumers start (a backlog to drain)."""
    warmup_s: float = 0.0
    """Latency percentiles leave out events published in the first this many seconds (reported apart)."""


@dataclass
class Sent:
    """What the publishers did, once they are all done."""

    published: int = 0
    per_key: dict[int, int] = field(default_factory=dict)
    first_ns: int = 0
    last_ns: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def duration_s(self) -> float:
        return max(self.last_ns - self.first_ns, 1) / 1e9


def _ranks(load: Load, index: int) -> tuple[list[int], Iterator[int]]:
    """This publisher's key indexes and an endless stream of local ranks to send to."""
    p = load.publishers
    local = max(1, (load.keys - index + p - 1) // p)
    keys = [r * p + index for r in range(local)]
    if load.skew is None:
        def turn() -> Iterator[int]:
            while True:
                yield from range(local)
        return keys, turn()
    cum: list[float] = []
    total = 0.0
    for r in range(local):
        total += 1.0 / (r + 1) ** load.skew
        cum.append(total)
    rnd = random.Random(index)

    def zipf() -> Iterator[int]:
        while True:
            yield min(bisect.bisect_left(cum, rnd.random() * total), local - 1)
    return keys, zipf()


def _share(total: int, parts: int, index: int) -> int:
    return total // parts + (1 if index < total % parts else 0)


def _publisher_main(t: Target, load: Load, index: int, counter: Any, conn: Any, go: Any) -> None:
    import uvloop

    from pool.publisher import Publisher

    keys, ranks = _ranks(load, index)
    names = [f"k{k}" for k in keys]
    counts = [0] * len(keys)
    total = _share(load.events, load.publishers, index)
    rate = load.rate / load.publishers if load.rate else None
    clock = time.monotonic_ns

    def event(i: int) -> tuple[str, str, bytes]:
        r = next(ranks)
        counts[r] += 1
        if i % COUNT_EVERY == 0:
            counter[index] = i
        return NAME, names[r], b'{"k":%d,"n":%d,"t":%d}' % (keys[r], counts[r], clock())

    def flat_out() -> Iterator[tuple[str, str, bytes]]:
        for i in range(total):
            yield event(i)

    async def paced() -> AsyncIterator[tuple[str, str, bytes]]:
        start = time.monotonic()
        for i in range(total):
            ahead = start + i / rate - time.monotonic()  # type: ignore[operator]
            if ahead > 0:
                await asyncio.sleep(ahead)
            yield event(i)

    async def main() -> tuple[int, int, int]:
        async with Publisher(t.url, prefix=t.prefix, name=f"bench-publisher-{index}") as pub:
            conn.send(("connected",))
            while not go.is_set():
                await asyncio.sleep(0.002)
            first = clock()
            # a node lost mid-run (bench cluster's failover): reconnect and re-send what was not confirmed
            sent = await pub.publish_many(paced() if rate else flat_out(), raw=True, retry_s=RETRY_S)
            return sent, first, clock()

    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            sent, first, last = runner.run(main())
        counter[index] = sent
        conn.send(("done", sent, {k: c for k, c in zip(keys, counts) if c}, first, last))
    except Exception as exc:  # noqa: BLE001 - reported to the bench, which fails the run
        conn.send(("error", f"publisher {index}: {exc!r}"))


class Publishers:
    """The publisher processes of one load; see the module docstring."""

    def __init__(self, target: Target, load: Load) -> None:
        self.target = target
        self.load = load
        self._counter = SPAWN.RawArray("q", load.publishers)
        self._go = SPAWN.Event()
        self._procs: list[Any] = []
        self._pipes: list[Any] = []
        self.go_ns = 0

    def start(self, timeout_s: float = 60) -> None:
        """Spawn and connect every publisher; they wait for ``go``."""
        for i in range(self.load.publishers):
            recv, send = SPAWN.Pipe(duplex=False)
            p = SPAWN.Process(target=_publisher_main, name=f"bench-publisher-{i}",
                              args=(self.target, self.load, i, self._counter, send, self._go), daemon=True)
            p.start()
            send.close()
            self._procs.append(p)
            self._pipes.append(recv)
        for i, pipe in enumerate(self._pipes):
            if not pipe.poll(timeout_s):
                raise RuntimeError(f"publisher {i} did not connect within {timeout_s:.0f}s")
            msg = pipe.recv()
            if msg[0] != "connected":
                raise RuntimeError(msg[1])

    def go(self) -> int:
        self.go_ns = time.monotonic_ns()
        self._go.set()
        return self.go_ns

    @property
    def sent(self) -> int:
        return sum(self._counter)

    def done(self) -> bool:
        return all(not p.is_alive() or pipe.poll() for p, pipe in zip(self._procs, self._pipes))

    def finish(self, timeout_s: float = 600) -> Sent:
        """Wait for every publisher's confirms and collect what they sent."""
        out = Sent()
        firsts, lasts = [], []
        for i, (p, pipe) in enumerate(zip(self._procs, self._pipes)):
            if not pipe.poll(timeout_s):
                out.errors.append(f"publisher {i} did not finish within {timeout_s:.0f}s")
                p.kill()
                continue
            try:
                msg = pipe.recv()
            except EOFError:
                out.errors.append(f"publisher {i} died (exit {p.exitcode})")
                continue
            if msg[0] == "error":
                out.errors.append(msg[1])
                continue
            _, sent, per_key, first, last = msg
            out.published += sent
            out.per_key.update(per_key)
            firsts.append(first)
            lasts.append(last)
        for p in self._procs:
            p.join(10)
        out.first_ns = min(firsts, default=self.go_ns)
        out.last_ns = max(lasts, default=self.go_ns)
        return out

    def kill(self) -> None:
        for p in self._procs:
            if p.is_alive():
                p.kill()
