"""The floor: the least a consumer can do on the same queues, to measure the pool against.

Data flow: ``Floor.start`` spawns one process per pool worker it stands for; process ``i``
takes partition queues ``i, i+N, i+2N, ...``. Each runs pika's ``AsyncioConnection`` on a
uvloop loop, one connection, one channel per queue with ``basic_qos(prefetch)``, and consumes
(``exclusive`` on classic queues, as the pool does; quorum partitions are single-active-
consumer already). Per delivery: decode the body with the same msgspec type the bench
controller uses, ``basic_ack`` it alone, count it in a 100 ms completion bucket (and, for
the latency scenario, keep ack time minus the publish time the event carried, and that publish
time). No work
queue, no confirms, no framework.

Every ``REPORT_S`` a process writes its count and its CPU time into shared arrays (the
progress line, the completion check and the CPU-per-event figure read them); on ``collect``
it closes its connection and sends back its buckets and its last delivery time.
"""

from __future__ import annotations

import asyncio
import resource
import time
from typing import Any

from .broker import Target
from .load import SPAWN
from .records import BUCKET_NS, Accounting

REPORT_S = 0.05  # how often a floor process publishes its count (cheap; keeps completion prompt)


def _cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


class BareConsumer:
    """One floor process's consumer, usable in-process too (``bench.profile_worker``)."""

    def __init__(self, url: str, queues: list[str], prefetch: int, exclusive: bool, name: str,
                 latency: bool = False) -> None:
        import msgspec

        from .controllers import Event

        self.url, self.queues, self.prefetch, self.exclusive, self.name = url, queues, prefetch, exclusive, name
        self.decode = msgspec.json.Decoder(Event).decode
        self.buckets: dict[int, int] = {}
        self.n = 0
        self.last_ns = 0
        self.latencies_ns: list[int] | None = [] if latency else None
        self.published_ns: list[int] = []
        self.raw: Any = None

    def on_message(self, ch: Any, method: Any, _props: Any, body: bytes) -> None:
        event = self.decode(body)
        ch.basic_ack(method.delivery_tag)
        now = time.monotonic_ns()
        if self.latencies_ns is not None:
            self.latencies_ns.append(now - event.t)
            self.published_ns.append(event.t)
        b = now // BUCKET_NS
        self.buckets[b] = self.buckets.get(b, 0) + 1
        self.n += 1
        self.last_ns = now

    async def start(self) -> None:
        """Connect, open a channel per queue with its prefetch, consume them all."""
        import pika
        from pika.adapters.asyncio_connection import AsyncioConnection

        loop = asyncio.get_running_loop()
        opened: asyncio.Future[Any] = loop.create_future()
        params = pika.URLParameters(self.url)
        params.client_properties = {"connection_name": self.name}
        self.raw = AsyncioConnection(params, on_open_callback=opened.set_result,
                                     on_open_error_callback=lambda _c, e: opened.set_exception(RuntimeError(repr(e))),
                                     custom_ioloop=loop)
        await opened

        async def subscribe(q: str) -> None:
            ch_open: asyncio.Future[Any] = loop.create_future()
            self.raw.channel(on_open_callback=ch_open.set_result)
            ch = await ch_open
            ok: asyncio.Future[Any] = loop.create_future()
            ch.basic_qos(prefetch_count=self.prefetch, callback=ok.set_result)
            await ok
            ok = loop.create_future()
            ch.basic_consume(q, self.on_message, exclusive=self.exclusive, callback=ok.set_result)
            await ok
        await asyncio.gather(*(subscribe(q) for q in self.queues))  # all at once, as the pool acquires

    async def close(self) -> None:
        if self.raw is not None and self.raw.is_open:
            self.raw.close()
        await asyncio.sleep(0.05)


def _floor_main(url: str, queues: list[str], prefetch: int, exclusive: bool, latency: bool, index: int,
                counter: Any, cpu: Any, conn: Any, stop: Any) -> None:
    import uvloop

    consumer = BareConsumer(url, queues, prefetch, exclusive, f"bench-floor-{index}", latency)

    async def main() -> None:
        await consumer.start()
        cpu[index] = _cpu_s()  # the CPU spent importing and subscribing is not the floor's per-event cost
        conn.send(("ready", time.monotonic_ns()))
        while not stop.is_set():
            counter[index] = consumer.n
            cpu[index] = _cpu_s()
            await asyncio.sleep(REPORT_S)
        counter[index] = consumer.n
        await consumer.close()
        conn.send(("done", consumer.buckets, consumer.last_ns, consumer.latencies_ns or [], consumer.published_ns))

    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(main())
    except Exception as exc:  # noqa: BLE001 - reported to the bench, which fails the run
        conn.send(("error", f"floor {index}: {exc!r}"))


class Floor:
    """``processes`` bare consumers over ``target``'s partition queues; see the module docstring."""

    side = "floor"

    def __init__(self, target: Target, processes: int, prefetch: int, latency: bool = False) -> None:
        self.target = target
        self.processes = processes
        self.prefetch = prefetch
        self.latency = latency
        self._counter = SPAWN.RawArray("q", processes)
        self._cpu = SPAWN.RawArray("d", processes)
        self._stop = SPAWN.Event()
        self._procs: list[Any] = []
        self._pipes: list[Any] = []
        self._base = 0

    def start(self, timeout_s: float = 60) -> int:
        """Spawn the consumers and wait until all consume; returns the monotonic ns they were all ready."""
        qs = self.target.partition_queues
        exclusive = self.target.queue_type == "classic"
        for i in range(self.processes):
            recv, send = SPAWN.Pipe(duplex=False)
            p = SPAWN.Process(target=_floor_main, name=f"bench-floor-{i}", daemon=True,
                              args=(self.target.url, qs[i::self.processes], self.prefetch, exclusive, self.latency, i,
                                    self._counter, self._cpu, send, self._stop))
            p.start()
            send.close()
            self._procs.append(p)
            self._pipes.append(recv)
        ready = 0
        for i, pipe in enumerate(self._pipes):
            if not pipe.poll(timeout_s):
                raise RuntimeError(f"floor consumer {i} not ready within {timeout_s:.0f}s")
            msg = pipe.recv()
            if msg[0] != "ready":
                raise RuntimeError(msg[1])
            ready = max(ready, msg[1])
        return ready

    @property
    def started(self) -> bool:
        return bool(self._procs)

    def begin(self) -> None:
        """A load starts: count deliveries from here."""
        self._base = sum(self._counter)

    def done(self) -> int:
        """Deliveries acked since ``begin`` (the floor covers one event per delivery)."""
        return sum(self._counter) - self._base

    def cpu_s(self) -> float:
        """CPU time the consumers used so far (as of their last report, at most ``REPORT_S`` old)."""
        return sum(self._cpu)

    def sample(self) -> None:
        """Nothing to sample: the floor's memory is not what the bench compares."""

    def collect(self) -> Accounting:
        """Stop the consumers and return their completion buckets and latencies (the floor is not reused)."""
        acc = Accounting(reconciles=self.done(), covered=self.done())
        self._stop.set()
        for i, (p, pipe) in enumerate(zip(self._procs, self._pipes)):
            msg: tuple[Any, ...] = ("error", f"floor consumer {i} sent no result")
            if pipe.poll(30):
                try:
                    msg = pipe.recv()
                except EOFError:
                    msg = ("error", f"floor consumer {i} died (exit {p.exitcode})")
            if msg[0] != "done":
                raise RuntimeError(msg[1])
            _, buckets, last, latencies_ns, published_ns = msg
            for b, c in buckets.items():
                acc.buckets[b] = acc.buckets.get(b, 0) + c
            acc.latencies_ms.extend(ns / 1e6 for ns in latencies_ns)
            acc.published_ns.extend(published_ns)
            acc.last_end_ns = max(acc.last_end_ns, last)
            p.join(10)
        acc.first_end_ns = min((b * BUCKET_NS for b in acc.buckets), default=0)
        self.close()
        return acc

    def close(self) -> None:
        self._stop.set()
        for p in self._procs:
            p.join(5)
            if p.is_alive():
                p.kill()
        self._procs.clear()
