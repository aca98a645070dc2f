"""``partitions`` and ``resize``: what the partition count costs the broker, and what changing it costs the pool.

partitions: the pool under a paced load (``--rate``, default 2,000 events/s) for each of 8, 16,
32 and 64 partitions (``--counts``), measuring the broker's CPU over the load (its ``beam.smp``,
user + system, as a share of one core) beside the pool's own: each partition queue is an Erlang
process woken per message, so more queues cost the broker more at the same rate (DESIGN fact 9).

resize: ``--rate`` events/s (default 2,000) published to 8 partitions with no pool until a backlog
of ``--events`` (default 50,000) waits; the pool starts, and ``FIRST_S`` later, the backlog still
draining, the controller grows to 64 (``ctlpool topology resize``, in process); ``SETTLE_S``
after that it shrinks back to 8 under the steady load. Per resize: how long it took, the
longest wait from publish to the start of a reconcile for events of keys the resize moved to
another partition and for keys it left where they were (events published from the start of
the resize to its end), and the throughput dip (the slowest 0.5 s of completions against the
median before the first resize). Which keys move is read off the broker: the same keys routed
through a scratch consistent-hash exchange with 8 and with 64 queues bound alike.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import replace
from typing import Any

import pika

from pool.replicas import ask
from pool.resize import resize as run_resize
from pool.settings import BrokerSettings

from .. import broker
from ..controllers import NAME
from ..load import Load, Publishers
from ..measure import run_phase
from ..report import Outcome
from .common import consumer

COUNTS = (8, 16, 32, 64)
RATE = 2000.0
DURATION_S = 20.0
BACKLOG = 50_000
FIRST_S = 2.0  # the pool starts on the backlog; the grow comes this long after, the backlog still there
SETTLE_S = 15.0  # paced load between the grow and the shrink
FROM, TO = 8, 64
BUCKET_S = 0.5


def _beam_cpu_s(url: str) -> tuple[Any, float]:
    """The broker's process and the CPU seconds it has used (``rabbitmqctl status`` names its pid)."""
    import psutil

    _node, status = ask(None, url, "status")
    proc = psutil.Process(int(status["pid"]))
    c = proc.cpu_times()
    return proc, c.user + c.system


def partitions(opts: Any) -> Outcome:
    rate = opts.rate or RATE
    duration = opts.duration_s or DURATION_S
    rows, results = [], {"scenario": "partitions", "rate": rate, "duration_s": duration, "runs": []}
    for count in opts.counts or COUNTS:
        o = replace(opts, partitions=count)
        load = Load(events=int(rate * duration), publishers=opts.publishers, keys=opts.keys, rate=rate)
        with consumer("pool", o, name=f"partitions-{count}") as (c, t):
            proc, cpu0 = _beam_cpu_s(opts.url)
            t0 = time.monotonic()
            ph = run_phase(c, t, load, f"{count} partitions")
            beam = proc.cpu_times()
            broker_pct = 100 * (beam.user + beam.system - cpu0) / (time.monotonic() - t0)
        run = {"partitions": count, "broker_cpu_pct": round(broker_pct, 1), "pool_cpu_us_per_event": ph.cpu_us_per_event,
               "p99_ms": ph.p99_ms, "lost": ph.lost, "overlaps": ph.overlaps, "events": ph.published}
        results["runs"].append(run)
        rows.append([count, rate, run["broker_cpu_pct"], ph.cpu_us_per_event, ph.p99_ms, ph.lost, ph.overlaps])
    results["events_per_s"] = rate
    results["events"] = sum(r["events"] for r in results["runs"])
    results["lost"] = sum(r["lost"] for r in results["runs"])
    results["overlaps"] = sum(r["overlaps"] for r in results["runs"])
    out = Outcome(results, ["partitions", "rate/s", "broker cpu % of a core", "pool cpu us/ev", "p99 ms", "lost",
                            "overlaps"], rows)
    out.notes.append("broker cpu: its beam.smp (user + system) over the whole phase, ramp and drain included")
    return out


def route(url: str, keys: list[str], queues: int) -> dict[str, int]:
    """Where each key lands on a consistent-hash exchange with ``queues`` queues bound in order, weight "1"."""
    prefix = broker.unique_prefix()
    ex, names = f"{prefix}.ring", [f"{prefix}.ring.q{i:03d}" for i in range(queues)]
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        ch = conn.channel()
        ch.exchange_declare(ex, "x-consistent-hash", auto_delete=False)
        for q in names:
            ch.queue_declare(q, arguments={"x-queue-type": "classic"})
            ch.queue_bind(q, ex, "1")
        ch.confirm_delivery()
        for k in keys:
            ch.basic_publish(ex, k, b"", mandatory=True)
        where = {}
        for i, q in enumerate(names):
            while (got := ch.basic_get(q, auto_ack=True))[0] is not None:
                where[got[0].routing_key] = i
        return where
    finally:
        ch = conn.channel()
        for q in names:
            ch.queue_delete(q)
        ch.exchange_delete(ex)
        conn.close()


def resize(opts: Any) -> Outcome:
    rate = opts.rate or RATE
    backlog = opts.events or BACKLOG
    o = replace(opts, partitions=FROM)
    ahead_s = backlog / rate  # the load publishes this long before the pool starts: the backlog
    load = Load(events=int(rate * (ahead_s + FIRST_S + SETTLE_S + 30)), publishers=opts.publishers, keys=opts.keys,
                rate=rate)
    keys = [f"k{i}" for i in range(opts.keys)]
    small, large = route(opts.url, keys, FROM), route(opts.url, keys, TO)
    moved = {i for i, k in enumerate(keys) if small[k] != large[k]}
    steps: list[tuple[str, int, int]] = []
    with consumer("pool", o, name="resize") as (c, t):
        bs = BrokerSettings(amqp_url=opts.url, prefix=t.prefix)
        pubs = Publishers(t, load)
        pubs.start()
        pubs.go()
        time.sleep(ahead_s)  # nobody consumes yet: a backlog of ``backlog`` events
        c.start()
        c.begin()
        for to, wait_s in ((TO, FIRST_S), (FROM, SETTLE_S)):  # the grow meets the backlog; the shrink a steady load
            time.sleep(wait_s)
            t0 = time.monotonic_ns()
            asyncio.run(run_resize(bs, replace(t.topology, partitions=to), NAME, to, lambda line: None))
            steps.append((f"{FROM if to == TO else TO} -> {to}", t0, time.monotonic_ns()))
        sent = pubs.finish()
        deadline = time.monotonic() + 120
        while c.done() < sent.published and time.monotonic() < deadline:
            time.sleep(0.2)
        acc = c.collect()
        records = list(c.reader.records)
    lost = max(0, sent.published - acc.covered)
    return _resize_outcome(records, steps, moved, rate, backlog, sent.published, lost, acc.overlaps)


def _resize_outcome(records: list[int], steps: list[tuple[str, int, int]], moved: set[int], rate: float,
                    backlog: int, published: int, lost: int, overlaps: int) -> Outcome:
    it = iter(records)
    rec = list(zip(it, it, it, it, it, it))  # key, n, covered, start, end, published
    ends = sorted(e for _k, _n, _c, _s, e, _t in rec)
    buckets: dict[int, int] = {}
    for e in ends:
        buckets[int(e // (BUCKET_S * 1e9))] = buckets.get(int(e // (BUCKET_S * 1e9)), 0) + 1
    first = steps[0][1] if steps else (ends[-1] if ends else 0)
    before = [n / BUCKET_S for b, n in buckets.items() if b * BUCKET_S * 1e9 < first - 2e9]
    rows, runs = [], []
    for label, t0, t1 in steps:
        window = [(k, s - t) for k, _n, _c, s, _e, t in rec if t0 <= t <= t1]
        wait_moved = max((w for k, w in window if k in moved), default=0) / 1e9
        wait_kept = max((w for k, w in window if k not in moved), default=0) / 1e9
        during = [buckets.get(b, 0) / BUCKET_S for b in range(int(t0 // (BUCKET_S * 1e9)), int(t1 // (BUCKET_S * 1e9)) + 1)]
        run = {"resize": label, "took_s": round((t1 - t0) / 1e9, 2), "max_wait_moved_s": round(wait_moved, 2),
               "max_wait_unmoved_s": round(wait_kept, 2), "slowest_half_second_per_s": min(during, default=0.0),
               "median_before_per_s": statistics.median(before) if before else 0.0}
        runs.append(run)
        rows.append([label, run["took_s"], run["max_wait_moved_s"], run["max_wait_unmoved_s"],
                     run["slowest_half_second_per_s"], run["median_before_per_s"]])
    results = {"scenario": "resize", "rate": rate, "backlog": backlog, "resizes": runs, "lost": lost,
               "overlaps": overlaps, "events": published, "moved_keys": len(moved),
               "events_per_s": statistics.median(before) if before else 0.0}
    out = Outcome(results, ["resize", "took s", "max wait moved s", "max wait unmoved s", "slowest 0.5 s /s",
                            "median before /s"], rows)
    out.notes.append(f"{len(moved)} keys move between {FROM} and {TO} partitions; lost {lost}, overlaps {overlaps} "
                     f"over {published:,} events; waits: publish to the start of a reconcile, for events published "
                     "while the resize ran")
    return out
