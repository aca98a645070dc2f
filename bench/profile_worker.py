"""Where a worker's CPU goes per event: one ``pool.worker.Worker`` in this process, under cProfile.

Data flow, once for the pool and once for the floor, each on a fresh topology: the
publishers (``bench.load``) preload a backlog and exit, so the consumer then runs alone at
full speed; here, on a uvloop loop, run either ``Worker(settings,
controllers=[bench.controllers.Noop()])`` with ``workers=1`` (it owns every partition;
``reroute_on_acquire=False``, since re-routing a preloaded backlog once is ``drain``'s
subject, not the steady hot path) or the floor's ``BareConsumer`` on every partition, and
count its deliveries (``Worker.stats.deliveries`` / ``BareConsumer.n``):

1. ``WARMUP`` deliveries, not measured;
2. ``--events`` deliveries with no profiler: CPU per delivery from ``getrusage`` (the true cost);
3. ``--events`` deliveries under ``cProfile.Profile(time.process_time)``: where that CPU goes.

Each profiled function's self time goes to a category: ``pool`` (ctlpool's code: decode,
work queue, dispatch, ack bookkeeping), ``pika`` (frame parsing and building, channel
dispatch, the ack frame), ``msgspec`` (body decode), ``bench`` (the recording controller; the
floor's own callback). C builtins and stdlib functions take their callers' categories
(weighted by the time each caller caused), so ``socket.send`` called by pika counts as pika
and ``asyncio.timeout`` entered by the worker counts as pool. cProfile's overhead is per
call, which inflates pika (many tiny calls) most, so the figures are calibrated on the
floor (nearly all pika): ``_calibrated`` explains how ctlpool's own microseconds per
delivery are derived. The plain pool-minus-floor difference is printed beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import pstats
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from . import broker
from .broker import Target
from .load import Load, Publishers

WARMUP = 5_000
SPARE = 10_000  # preloaded beyond the windows: consumed while subscribing, or past a window's count
STALL_S = 30.0  # no delivery for this long: the broker or the consumer is stuck; give up
DEFAULT_EVENTS = 40_000
CATEGORIES = ("pool", "pika", "msgspec", "bench", "other")


def _cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _category(path: str, func: str) -> str | None:
    """The category a profiled function belongs to by itself, or None (take the caller's)."""
    if "msgspec" in func:
        return "msgspec"
    for name in ("pool", "pika", "bench"):
        if f"{os.sep}{name}{os.sep}" in path:
            return name
    return None


def shares(stats: dict[Any, Any]) -> dict[Any, dict[str, float]]:
    """Per profiled function, the fraction of its self time each category accounts for.

    A function of ``pool``, ``pika``, ``bench`` or ``msgspec`` is all its own category; any other
    (C builtins, stdlib) splits over its callers' categories by the self time each caused."""
    memo: dict[Any, dict[str, float]] = {}
    visiting: set[Any] = set()

    def share(key: Any) -> dict[str, float]:
        own = _category(key[0], key[2])
        if own is not None:
            return {own: 1.0}
        if key in memo:
            return memo[key]
        if key in visiting or key not in stats:
            return {"other": 1.0}
        visiting.add(key)
        weights = {c: t[2] or t[1] for c, t in stats[key][4].items()}  # caller-specific self time (or calls)
        total = sum(weights.values())
        d: dict[str, float] = {}
        for caller, w in weights.items():
            for cat, frac in share(caller).items():
                d[cat] = d.get(cat, 0.0) + frac * w / total
        visiting.discard(key)
        memo[key] = d or {"other": 1.0}
        return memo[key]

    return {key: share(key) for key in stats}


async def _windows(count: Callable[[], int], failed: Callable[[], None], n: int, total: int,
                   prof: cProfile.Profile) -> dict[str, Any]:
    """Warm-up, then ``n`` deliveries plain (CPU from getrusage), then ``n`` under ``prof``, then the rest.

    Draining the spare leaves the queues empty: deleting quorum queues full of messages is
    slow on the broker, and leftovers would be a poor start for the next side."""
    async def until(target: int) -> None:
        last, moved = count(), time.monotonic()
        while count() < target:
            failed()
            if count() != last:
                last, moved = count(), time.monotonic()
            elif time.monotonic() - moved > STALL_S:
                raise RuntimeError(f"no delivery for {STALL_S:.0f}s at {last:,} of {target:,}")
            await asyncio.sleep(0.005)

    await until(count() + WARMUP)
    d0, c0, w0 = count(), _cpu_s(), time.monotonic()
    await until(d0 + n)
    d1, c1, w1 = count(), _cpu_s(), time.monotonic()
    prof.enable()
    await until(d1 + n)
    prof.disable()
    d2, c2 = count(), _cpu_s()
    await until(total)
    return {"plain_events": d1 - d0, "plain_cpu_s": c1 - c0, "plain_wall_s": w1 - w0,
            "profiled_events": d2 - d1, "profiled_cpu_s": c2 - c1}


def _run_side(side: str, args: argparse.Namespace, n: int, prof: cProfile.Profile) -> dict[str, Any]:
    """Profile the pool's Worker (side "pool") or the floor's bare consumer (side "floor") on a fresh topology."""
    import uvloop

    from bench.controllers import Noop, flush
    from bench.floor import BareConsumer
    from pool.messages import WorkerState
    from pool.settings import BrokerSettings, PoolSettings, TopologySettings, WorkerSettings
    from pool.worker import Worker

    t = Target(args.url, broker.unique_prefix(), args.partitions, args.queue_type)
    broker.declare(t)
    total = WARMUP + 2 * n + SPARE
    pubs = Publishers(t, Load(events=total, publishers=args.publishers, keys=args.keys, preload=True))
    figures: dict[str, Any] = {}

    async def pool_side() -> None:
        settings = PoolSettings(controllers=("bench.controllers:Noop",), workers=1, pin=False,
                                broker=BrokerSettings(amqp_url=t.url, prefix=t.prefix),
                                topology=TopologySettings(partitions=t.partitions, queue_type=t.queue_type),
                                worker=WorkerSettings(prefetch=args.prefetch, concurrency=args.concurrency,
                                                      reroute_on_acquire=False))
        ready = asyncio.Event()
        worker = Worker(settings=settings, controllers=[Noop()],
                        on_state=lambda s: ready.set() if s is WorkerState.READY else None)
        run = asyncio.ensure_future(worker.run())
        await asyncio.wait_for(ready.wait(), 120)

        def failed() -> None:
            if run.done():
                raise RuntimeError(f"worker stopped: {run.exception()!r}")
        figures.update(await _windows(lambda: worker.stats.deliveries, failed, n, total, prof))
        worker.request_stop()
        await run

    async def floor_side() -> None:
        consumer = BareConsumer(t.url, t.partition_queues, args.prefetch, t.queue_type == "classic",
                                "bench-profile-floor")
        await consumer.start()
        figures.update(await _windows(lambda: consumer.n, lambda: None, n, total, prof))
        await consumer.close()

    pubs.start()
    try:
        pubs.go()
        sent = pubs.finish()
        if sent.errors:
            raise RuntimeError("; ".join(sent.errors))
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(pool_side() if side == "pool" else floor_side())
    finally:
        pubs.kill()
        flush()
        broker.delete_or_warn(t)
    return figures


def profile(args: argparse.Namespace, out: Path) -> int:
    from pool.logs import configure

    n = args.events or DEFAULT_EVENTS
    records = tempfile.mkdtemp(prefix="bench-profile-")
    os.environ["BENCH_RECORD_DIR"] = records
    configure("text", "warning")
    report: dict[str, Any] = {"scenario": "profile", "events": n}
    try:
        for side in ("pool", "floor"):
            prof = cProfile.Profile(time.process_time)
            print(f"[profile {side}] {WARMUP:,} warm-up + {n:,} plain + {n:,} profiled deliveries ...",
                  file=sys.stderr)
            report[side] = _report(prof, _run_side(side, args, n, prof), args.top)
            prof.dump_stats(str(out / f"{side}.prof"))
    finally:
        shutil.rmtree(records, ignore_errors=True)
    report.update(_calibrated(report["pool"], report["floor"]))
    (out / "profile.json").write_text(json.dumps(report, indent=2) + "\n")
    _print(report)
    print(f"results: {out / 'profile.json'}  raw profiles: {out / 'pool.prof'}, {out / 'floor.prof'} "
          "(python -m pstats FILE)")
    return 0


def _report(prof: cProfile.Profile, f: dict[str, Any], top: int) -> dict[str, Any]:
    """One side's figures: plain and profiled CPU per delivery, raw profiled microseconds by category."""
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    n = f["profiled_events"]
    cats = dict.fromkeys(CATEGORIES, 0.0)
    sh = shares(stats)
    for key, frac in sh.items():
        for cat, x in frac.items():
            cats[cat] += stats[key][2] * x / n * 1e6
    profiled = f["profiled_cpu_s"] / n * 1e6
    cats["unattributed"] = max(profiled - sum(cats.values()), 0.0)
    ranked = sorted(stats.items(), key=lambda kv: -kv[1][2])

    def row(k: Any, v: Any) -> dict[str, Any]:
        return {"function": f"{os.path.basename(k[0])}:{k[1]}({k[2]})", "calls_per_event": round(v[1] / n, 2),
                "raw_self_us_per_event": round(v[2] / n * 1e6, 2), "category": max(sh[k], key=lambda c: sh[k][c])}
    return {
        "cpu_us_per_event": round(f["plain_cpu_s"] / f["plain_events"] * 1e6, 2),
        "events_per_s_while_measured": round(f["plain_events"] / f["plain_wall_s"], 1),
        "profiled_cpu_us_per_event": round(profiled, 2),
        "raw_us_per_event_by_category": {c: round(v, 2) for c, v in cats.items()},
        "top_functions": [row(k, v) for k, v in ranked[:top]],
        "pool_functions": [row(k, v) for k, v in ranked if sh[k].get("pool", 0) >= 0.5][:top],
        **f,
    }


def _calibrated(p: dict[str, Any], f: dict[str, Any]) -> dict[str, Any]:
    """The pool's own CPU per delivery, with pika's cost calibrated on the floor.

    cProfile's overhead is per call, so raw profiled microseconds overstate code made of many
    small calls (pika) more than anything else. The floor is nearly all pika, so its
    plain / profiled ratio converts the pool side's raw pika, msgspec and bench microseconds
    into real ones; what is left of the pool worker's plain CPU is ctlpool's own cost,
    including the C work it causes (Task objects, timer handles) that no Python frame shows."""
    scale = f["cpu_us_per_event"] / f["profiled_cpu_us_per_event"]
    raw = p["raw_us_per_event_by_category"]
    pika = raw["pika"] * scale
    others = (raw["msgspec"] + raw["bench"]) * scale
    own = p["cpu_us_per_event"] - pika - others
    return {"cpu_us_per_event": p["cpu_us_per_event"], "floor_cpu_us_per_event": f["cpu_us_per_event"],
            "pool_minus_floor_us_per_event": round(p["cpu_us_per_event"] - f["cpu_us_per_event"], 2),
            "calibration": round(scale, 4), "pool_pika_us_per_event": round(pika, 2),
            "pool_bench_and_decode_us_per_event": round(others, 2),
            "pool_hot_path_us_per_event": round(own + raw["msgspec"] * scale, 2)}


def _print(r: dict[str, Any]) -> None:
    p, f = r["pool"], r["floor"]
    print(f"CPU per delivery, no profiler: pool worker {p['cpu_us_per_event']:.1f} us "
          f"({p['events_per_s_while_measured']:,.0f}/s), floor {f['cpu_us_per_event']:.1f} us "
          f"({f['events_per_s_while_measured']:,.0f}/s): the pool adds {r['pool_minus_floor_us_per_event']:.1f} us")
    print(f"pool worker, calibrated on the floor: pika {r['pool_pika_us_per_event']:.1f} us, bench recorder + "
          f"msgspec {r['pool_bench_and_decode_us_per_event']:.1f} us, ctlpool's own hot path (decode + dispatch + "
          f"ack bookkeeping, incl. the C work it causes) {r['pool_hot_path_us_per_event']:.1f} us (bar: 25)")
    print("raw cProfile self time per delivery, by category (inflated by the profiler; compare, don't add):")
    print(f"  {'':<13} {'pool':>8} {'floor':>8}")
    pc, fc = p["raw_us_per_event_by_category"], f["raw_us_per_event_by_category"]
    for cat in pc:
        print(f"  {cat:<13} {pc[cat]:8.2f} {fc[cat]:8.2f}")
    for side, key in (("pool", "pool_functions"), ("floor", "top_functions")):
        what = "ctlpool's functions (and builtins/stdlib they call)" if side == "pool" else "top functions"
        print(f"\n{side}: {what} by raw self time per delivery (calls per delivery, category):")
        for row in r[side][key]:
            print(f"  {row['raw_self_us_per_event']:7.2f} us  {row['calls_per_event']:6.2f}  {row['category']:<8} "
                  f"{row['function']}")


if __name__ == "__main__":  # pragma: no cover - use python -m bench profile
    sys.exit("run: python -m bench profile [options]")
