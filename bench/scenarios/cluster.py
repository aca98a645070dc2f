"""``cluster``: the pool on the local 3-node cluster beside the pool on the single broker, same run.

Data flow: ``pool.devcluster`` brings the cluster up (or finds it up). Each round runs the
pool under the same saturating load on the single broker (``--amqp-url``) and on the cluster
(its three URLs; quorum queues replicated on every node, leaders spread), alternating who goes
first; then a paced load (``--rate``) on each for latency. The ratios cluster / single are the
price of replication. Last, the failover: a paced run on the cluster during which the node most
of the pool's consume connections use is SIGKILLed; the figure is the longest stretch of 100 ms
buckets with no completed reconcile after the kill (the gap), with lost and overlaps counted.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import replace

from pool.devcluster import NODES, LocalCluster

from ..load import Load
from ..measure import Phase, run_phase
from ..report import Outcome, median, ratio
from .common import Options, consumer, guarantees

EVENTS = 30_000  # per side and round: 2-7 s of saturation on the 2-core box
RATE = 1000.0  # paced load (latency, failover)
DURATION_S = 12.0
KILL_AFTER_S = 4.0


def _consume_node(lc: LocalCluster) -> int | None:
    """The node most of the pool's consume connections (``ctlpool <member> consume``) use."""
    used = Counter(node for node, name in lc.connections() if name.endswith(" consume"))
    return used.most_common(1)[0][0] if used else None


def _gap_s(ph: Phase, after_s: float) -> float:
    """Longest time with no completion in the timeline after ``after_s`` (100 ms buckets)."""
    times = [t for t, rate in ph.timeline if rate > 0 and t >= after_s - 0.1]
    return max((b - a for a, b in zip(times, times[1:])), default=0.0)


def cluster(opts: Options) -> Outcome:
    lc = LocalCluster()
    lc.up()
    sides = {"single": opts, "cluster": replace(opts, url=lc.url_list())}
    flat = Load(events=opts.events or EVENTS, publishers=opts.publishers, keys=opts.keys)
    rate = opts.rate or RATE
    paced = Load(events=int(rate * (opts.duration_s or DURATION_S)), publishers=opts.publishers, keys=opts.keys,
                 rate=rate)
    runs: dict[str, dict[str, list[Phase]]] = {s: {"saturate": [], "latency": []} for s in sides}
    for r in range(opts.rounds):
        order = list(sides) if r % 2 == 0 else list(reversed(sides))
        for what, load in (("saturate", flat), ("latency", paced)):
            for side in order:
                with consumer("pool", sides[side], name=f"cluster-{what}-{side}{r}") as (c, t):
                    runs[side][what].append(run_phase(c, t, load, f"{what} on the {side}"))
    # failover: kill the node the pool mostly consumes from, mid-run
    killed: list[int] = []
    with consumer("pool", sides["cluster"], name="cluster-failover") as (c, t):
        def kill() -> None:
            node = _consume_node(lc)
            if node is not None:
                lc.kill(node)
                killed.append(node)
        timer = threading.Timer(KILL_AFTER_S, kill)
        timer.start()
        try:
            failover = run_phase(c, t, paced, "failover on the cluster")
        finally:
            timer.cancel()
    lc.up()  # the killed node back
    rate_of = {s: median([p.events_per_s for p in runs[s]["saturate"]]) for s in sides}
    p99_of = {s: median([p.p99_ms for p in runs[s]["latency"]]) for s in sides}
    gap = _gap_s(failover, KILL_AFTER_S) if killed else None
    every = [p for s in sides for w in ("saturate", "latency") for p in runs[s][w]] + [failover]
    results = {"scenario": "cluster", **guarantees(every), "events_per_s": rate_of["cluster"],
               "single_events_per_s": rate_of["single"], "ratio": ratio(rate_of["cluster"], rate_of["single"]),
               "p99_ms": p99_of["cluster"], "single_p99_ms": p99_of["single"],
               "p99_ratio": ratio(p99_of["cluster"], p99_of["single"]), "failover_gap_s": gap,
               "failover_killed": NODES[killed[0] - 1].name if killed else None,
               "failover_lost": failover.lost, "failover_overlaps": failover.overlaps,
               "cpu_us_per_event": median([p.cpu_us_per_event for p in runs["cluster"]["saturate"]]),
               "single_cpu_us_per_event": median([p.cpu_us_per_event for p in runs["single"]["saturate"]])}
    rows = [[f"{what} {side} {i}", p.published, p.events_per_s, p.p99_ms, p.cpu_us_per_event, p.lost, p.overlaps]
            for side in sides for what in ("saturate", "latency") for i, p in enumerate(runs[side][what])]
    rows.append(["failover (cluster)", failover.published, failover.events_per_s, failover.p99_ms,
                 failover.cpu_us_per_event, failover.lost, failover.overlaps])
    out = Outcome(results, ["run", "events", "events/s", "p99 ms", "cpu us/ev", "lost", "overlaps"], rows)
    out.notes.append(f"failover: {results['failover_killed'] or 'no node'} SIGKILLed {KILL_AFTER_S:g} s into a "
                     f"{rate:g}/s load; longest gap with no completed reconcile after it: "
                     f"{gap if gap is None else round(gap, 2)} s")
    for p in every:
        out.notes += [f"{p.side}: {e}" for e in p.errors]
    return out
