"""``latency`` and ``hotkeys``: the pool alone, under a paced load or a skewed one.

latency: ``--rate`` events/s (default 2,000) for ``--warmup-s`` (default 1 s) and then
``--duration-s`` (default 20 s); each reconcile's latency is its end minus the publish time its
event carried (one monotonic clock on the host), so it spans publisher, broker, partition
queue, work queue and reconcile. A coalesced reconcile counts once, for its latest event. The
floor then takes the same paced load on a topology of its own; its latency ends at its ack.
Side by side they show how much of the tail is the broker and this machine rather than the
pool. The warm-up's events are reconciled and counted (lost, overlaps) like the rest, but
their latencies are reported apart (``warmup_*``): in the first ~200 ms of a load from cold
latencies climb to 40-190 ms on this box, for the floor too (its warm-up p99 has been about
half the pool's); the pool's deliveries arrive late rather than wait in the worker (~0.05 ms
each there), so it is the path through the broker starting up, not the steady latency the
percentiles are meant to show.

hotkeys: Zipf-distributed keys (``--skew``, default 1.1) and a controller that holds each
key ``--sleep-ms`` (default 2 ms, ``asyncio.sleep``); events that arrive while their key is
being reconciled collapse into one follow-up reconcile, and no key may ever be reconciled
twice at once (overlaps).
"""

from __future__ import annotations

from dataclasses import replace

from .. import plots
from ..load import Load
from ..measure import Phase, run_phase
from ..report import Outcome, median
from .common import PHASE_HEADER, Options, consumer, guarantees, pairs, phase_row

RATE = 2000.0  # events/s: issue 4's latency bar is stated at this rate
DURATION_S = 20.0
HOTKEY_EVENTS = 200_000  # ~20 s here
SLEEP_MS = 2.0  # hotkeys: each reconcile holds its key this long
TOP_KEYS = 30  # keys shown in the hot-keys plot


def _base(name: str, ph: Phase) -> dict[str, object]:
    return {"scenario": name, **guarantees([ph]), "events_per_s": ph.events_per_s, "p50_ms": ph.p50_ms,
            "p90_ms": ph.p90_ms, "p99_ms": ph.p99_ms, "max_ms": ph.max_ms, "max_rss_mb": ph.max_rss_mb,
            "cpu_us_per_event": ph.cpu_us_per_event, "pool": ph.summary()}


def latency(opts: Options) -> Outcome:
    rate = opts.rate or RATE
    duration = opts.duration_s or DURATION_S
    warmup = opts.warmup_s
    events = opts.events or int(rate * (warmup + duration))
    if events <= rate * warmup:
        raise ValueError(f"--events {events} are all published within --warmup-s {warmup:g}: nothing left to measure")
    load = Load(events=events, publishers=opts.publishers, keys=opts.keys, rate=rate, warmup_s=warmup)
    pools, floors = pairs(opts, load, "latency", latency=True)
    qs = ("p50_ms", "p90_ms", "p99_ms", "max_ms")
    wq = ("warmup_p50_ms", "warmup_p99_ms", "warmup_max_ms")
    results = {"scenario": "latency", **guarantees(pools), "rate": rate, "duration_s": duration, "warmup_s": warmup,
               "events_per_s": median([p.events_per_s for p in pools]),
               **{q: median([getattr(p, q) for p in pools]) for q in qs},
               **{f"floor_{q}": median([getattr(f, q) for f in floors]) for q in qs},
               **({pre + q: median([getattr(ph, q) for ph in side]) for pre, side in (("", pools), ("floor_", floors))
                   for q in wq} if warmup else {}),
               "max_rss_mb": max(p.max_rss_mb for p in pools),
               "cpu_us_per_event": median([p.cpu_us_per_event for p in pools]),
               "pool": [p.summary() for p in pools], "floor": [f.summary() for f in floors]}
    rows = [[f"{ph.side} {i}", rate, ph.published, ph.p50_ms, ph.p90_ms, ph.p99_ms, ph.max_ms, ph.warmup_p99_ms,
             ph.lost if ph.side == "pool" else None, ph.overlaps if ph.side == "pool" else None]
            for side in (pools, floors) for i, ph in enumerate(side)]
    if opts.rounds > 1:
        rows += [[f"{side} median", rate, None] + [results[pre + q] for q in qs]
                 + [results.get(pre + "warmup_p99_ms"), None, None] for side, pre in (("pool", ""), ("floor", "floor_"))]
    out = Outcome(results, ["run", "rate/s", "events", "p50 ms", "p90 ms", "p99 ms", "max ms", "warm-up p99",
                            "lost", "overlaps"], rows)
    if warmup:
        out.notes.append(f"p50..max: events published after the first {warmup:g} s; "
                         f"warm-up p99: those of the first {warmup:g} s (--warmup-s 0 measures them all together)")
    for ph in pools:
        out.notes += ph.errors
    ph, fl = pools[0], floors[0]
    if opts.plots and plots.available() and ph.latencies_ms:
        marks = {"p50": ph.p50_ms, "p90": ph.p90_ms, "p99": ph.p99_ms}
        out.plots.append(plots.latency_histogram(opts.out, "latency_hist.png", ph.latencies_ms, marks,
                                                 f"latency at {rate:,.0f} events/s, {opts.workers} workers"
                                                 + (" (round 0)" if opts.rounds > 1 else ""),
                                                 floor_ms=fl.latencies_ms))
        out.plots.append(plots.timelines(opts.out, "latency_timeline.png", "latency: completions/s",
                                         {"pool": ph.timeline, "floor": fl.timeline}))
    return out


def hotkeys(opts: Options) -> Outcome:
    opts = replace(opts, sleep_ms=opts.sleep_ms if opts.sleep_ms is not None else SLEEP_MS)
    load = Load(events=opts.events or HOTKEY_EVENTS, publishers=opts.publishers, keys=opts.keys, skew=opts.skew)
    with consumer("pool", opts, name="hotkeys-pool", controller="Sleepy") as (c, t):
        ph = run_phase(c, t, load, "hotkeys pool")
    saved = ph.published - ph.reconciles
    base = _base("hotkeys", ph)
    # a burst's latencies are mostly queueing behind the backlog, not the latency bar's figure
    base["latency_under_load_ms"] = {k: base.pop(k) for k in ("p50_ms", "p90_ms", "p99_ms", "max_ms")}
    results = {**base, "reconciles": ph.reconciles, "saved": saved,
               "saved_pct": round(100 * saved / max(ph.published, 1), 1), "skew": opts.skew,
               "sleep_ms": opts.sleep_ms, "keys": opts.keys}
    top = sorted(ph.per_key, key=lambda k: -ph.per_key[k])[:TOP_KEYS]
    results["top_keys"] = [{"key": f"k{k}", "events": ph.per_key[k], "reconciles": ph.reconciles_per_key.get(k, 0)}
                           for k in top[:10]]
    rows = [phase_row(ph, "pool")]
    out = Outcome(results, PHASE_HEADER + ["reconciles", "saved"], [rows[0] + [ph.reconciles, saved]])
    out.notes += ph.errors
    if opts.plots and plots.available():
        out.plots.append(plots.hot_keys(opts.out, "hotkeys.png", [ph.per_key[k] for k in top],
                                        [ph.reconciles_per_key.get(k, 0) for k in top],
                                        f"hot keys (Zipf s={opts.skew}, {opts.sleep_ms:g} ms per reconcile)"))
    return out
