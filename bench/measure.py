"""One load against one consumer (the pool or the floor), measured the same way for both.

Data flow of ``run_phase``:

1. spawn the publishers (``bench.load``) and let them connect;
2. ``load.preload``: publish everything, then start the consumer (time runs from "ready");
   otherwise: start the consumer if needed, then release the publishers (time runs from "go");
3. every ``TICK_S``: ask the consumer how many events it covered, draw the progress line,
   sample worker RSS; stop when everything published is covered (or nothing moved for
   ``STALL_S`` after the publishers finished: then the missing events are lost, or parked);
4. ``consumer.collect()`` turns what it recorded into an ``Accounting``; this module
   derives the figures (``Phase``): steady-window throughput (the middle ``1 - 2*TRIM`` of
   the publishing interval) for a live load, drain throughput (events / time from ready to
   the last completion) for a preloaded one, CPU per event, latencies (those of events
   published in the first ``load.warmup_s`` apart), lost, overlaps.

The consumer is duck-typed: ``start() -> ready ns``, ``started``, ``begin()``, ``done() ->
events covered``, ``cpu_s()``, ``sample()``, ``collect() -> Accounting`` — ``PoolProcess``
and ``Floor`` both have them.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from . import broker
from .broker import Target
from .load import Load, Publishers, Sent
from .progress import Progress
from .records import BUCKET_NS, Accounting, percentile, split_warmup

TICK_S = 0.1
RSS_EVERY_TICKS = 5  # psutil reads cost the 2-core box a little CPU; twice a second is plenty
STALL_S = 20.0  # no completion for this long after the last confirm: the rest is lost (or parked)
TRIM = 0.1  # warm-up and wind-down trimmed off each end of the publishing interval
TIMELINE_BUCKETS = 5  # the plotted rate is averaged over 0.5 s
KEPT_UP = 0.1  # backlog under this fraction of the load when publishing ended: publisher-bound


@dataclass
class Phase:
    """The figures of one load on one consumer."""

    side: str
    prefix: str = ""
    published: int = 0
    covered: int = 0
    duplicates: int = 0
    reconciles: int = 0
    parked: int = 0
    lost: int = 0
    overlaps: int = 0
    events_per_s: float = 0.0
    publish_per_s: float = 0.0
    window_s: float = 0.0
    elapsed_s: float = 0.0
    first_s: float = 0.0  # start -> first completion (drain: the pool's guard re-routes first)
    kept_up: bool = False
    cpu_us_per_event: float = 0.0
    max_rss_mb: float = 0.0
    rerouted: int = 0
    pinned: bool | None = None  # pool: every worker pinned to one CPU (``--pin``; auto: not next to the broker)
    p50_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None
    warmup_s: float = 0.0  # events published this long after the first were left out of p50..max
    warmup_p50_ms: float | None = None  # ... and are these figures instead
    warmup_p99_ms: float | None = None
    warmup_max_ms: float | None = None
    errors: list[str] = field(default_factory=list)
    timeline: list[tuple[float, float]] = field(default_factory=list)  # (s since start, events/s)
    latencies_ms: list[float] = field(default_factory=list, repr=False)
    per_key: dict[int, int] = field(default_factory=dict, repr=False)
    reconciles_per_key: dict[int, int] = field(default_factory=dict, repr=False)

    def summary(self) -> dict[str, Any]:
        """JSON-ready figures (no per-event lists)."""
        d = asdict(self)
        for k in ("latencies_ms", "per_key", "reconciles_per_key"):
            d.pop(k)
        return d


def run_phase(consumer: Any, target: Target, load: Load, label: str) -> Phase:
    """Measure ``load`` on ``consumer``; see the module docstring."""
    pubs = Publishers(target, load)
    progress = Progress(label)
    try:
        pubs.start()
        sent: Sent | None = None
        if load.preload:
            pubs.go()
            while not pubs.done():
                progress.show(pubs.sent, load.events, 0, "(preloading)")
                time.sleep(TICK_S)
            sent = pubs.finish()
            consumer.begin()  # before start: a preloaded consumer starts covering events at once
            t0 = consumer.start()
            cpu0 = consumer.cpu_s()
        else:
            if not consumer.started:
                consumer.start()
            consumer.begin()
            cpu0 = consumer.cpu_s()
            t0 = pubs.go()
        done_at_publish_end = 0
        last_move, last_done, tick = time.monotonic(), -1, 0
        while True:
            done = consumer.done()
            if sent is None and pubs.done():
                sent = pubs.finish()
                done_at_publish_end = done
            tick += 1
            if tick % RSS_EVERY_TICKS == 0:
                consumer.sample()
            progress.show(pubs.sent, load.events, done)
            if done != last_done:
                last_move, last_done = time.monotonic(), done
            if sent is not None and (done >= sent.published or sent.errors):
                break
            if sent is not None and time.monotonic() - last_move > STALL_S:
                progress.end(f"no progress for {STALL_S:.0f}s; {sent.published - done:,} events missing")
                break
            time.sleep(TICK_S)
        cpu = consumer.cpu_s() - cpu0
        consumer.sample()
    finally:
        pubs.kill()
    if sent is None or sent.errors:
        raise RuntimeError("publishing failed: " + ("; ".join(sent.errors) if sent else "no result"))
    acc = consumer.collect()
    phase = _figures(consumer, target, load, sent, acc, t0, cpu, done_at_publish_end)
    progress.end(f"{phase.covered:,}/{phase.published:,} events in {phase.elapsed_s:.1f}s, "
                 f"{phase.events_per_s:,.0f} ev/s")
    return phase


def _figures(consumer: Any, target: Target, load: Load, sent: Sent, acc: Accounting, t0: int, cpu_s: float,
             done_at_publish_end: int) -> Phase:
    ph = Phase(side=consumer.side, prefix=target.prefix, published=sent.published, covered=acc.covered,
               duplicates=acc.duplicates, reconciles=acc.reconciles, overlaps=acc.overlaps,
               publish_per_s=sent.published / sent.duration_s, per_key=sent.per_key)
    if consumer.side == "pool":
        ph.parked = broker.depths(target.url, [target.names.parked])[target.names.parked]
        ph.max_rss_mb = round(consumer.max_rss_mb, 1)
        ph.rerouted = consumer.rerouted()
        ph.pinned = consumer.pinned
        ph.errors += consumer.errors()
        ph.reconciles_per_key = _reconciles_per_key(consumer.reader.records)
    ph.lost = max(0, ph.published - ph.covered - ph.parked)
    ph.elapsed_s = max(acc.last_end_ns - t0, 0) / 1e9
    ph.first_s = round((acc.first_end_ns - t0) / 1e9, 3) if acc.first_end_ns else 0.0
    ph.cpu_us_per_event = round(cpu_s / max(ph.covered, 1) * 1e6, 2)
    if load.preload:
        ph.window_s = ph.elapsed_s
        ph.events_per_s = ph.covered / ph.elapsed_s if ph.elapsed_s else 0.0
    else:
        lo = sent.first_ns + TRIM * (sent.last_ns - sent.first_ns)
        hi = sent.last_ns - TRIM * (sent.last_ns - sent.first_ns)
        whole = [b for b in acc.buckets if b * BUCKET_NS >= lo and (b + 1) * BUCKET_NS <= hi]
        ph.window_s = len(whole) * BUCKET_NS / 1e9 if whole else 0.0
        if ph.window_s:
            ph.events_per_s = sum(acc.buckets[b] for b in whole) / ph.window_s
        elif ph.elapsed_s:
            ph.events_per_s = ph.covered / ph.elapsed_s  # a load too short for a steady window
        ph.kept_up = sent.published - done_at_publish_end < KEPT_UP * max(sent.published, 1)
    ph.timeline = _timeline(acc.buckets, t0)
    lat, warm = split_warmup(acc.latencies_ms, acc.published_ns, sent.first_ns + int(load.warmup_s * 1e9))
    if lat and not load.preload:
        ph.latencies_ms = lat
        ph.p50_ms, ph.p90_ms, ph.p99_ms = (round(percentile(lat, q), 2) for q in (50, 90, 99))
        ph.max_ms = round(lat[-1], 2)
    if warm and not load.preload:
        ph.warmup_s = load.warmup_s
        ph.warmup_p50_ms, ph.warmup_p99_ms = (round(percentile(warm, q), 2) for q in (50, 99))
        ph.warmup_max_ms = round(warm[-1], 2)
    ph.events_per_s = round(ph.events_per_s, 1)
    ph.publish_per_s = round(ph.publish_per_s, 1)
    return ph


def _timeline(buckets: dict[int, int], t0: int) -> list[tuple[float, float]]:
    """Completions per second in ``TIMELINE_BUCKETS`` steps (100 ms buckets are too jumpy to read), from t0."""
    if not buckets:
        return []
    first, last = min(buckets), max(buckets)
    step = TIMELINE_BUCKETS
    per_s = 1e9 / (BUCKET_NS * step)
    return [(round((b * BUCKET_NS - t0) / 1e9, 2), sum(buckets.get(b + i, 0) for i in range(step)) * per_s)
            for b in range(first, last + 1, step)]


def _reconciles_per_key(records: Any) -> dict[int, int]:
    out: dict[int, int] = {}
    for key in records[0::6]:
        out[key] = out.get(key, 0) + 1
    return out
