"""``saturate`` and ``drain``: the pool beside the floor under the same publishers.

saturate: publishers send as fast as confirms allow while the consumers run; the figure is
completions per second over the steady window (``bench.measure``). drain: the whole load is
preloaded first, then the consumers start; the figure is events / time from ready to the
last completion. The pool drains twice: on partitions known clean (the usual case: a pool
restart, a handover), and as after a broker restart, where the ring-drift guard first
re-routes the whole backlog (``rerouted`` per backlog event must stay <= 1).
"""

from __future__ import annotations

from .. import plots
from ..load import Load
from ..measure import Phase
from ..report import Outcome, median, ratio
from ..measure import run_phase
from .common import PHASE_HEADER, Options, consumer, guarantees, pairs, phase_row

SATURATE_EVENTS = 150_000  # ~8-10 s of publishing per side on the 2-core box
DRAIN_EVENTS = 50_000  # issue 4's bar is stated for a 50,000-event drain


def _outcome(name: str, opts: Options, pools: list[Phase], floors: list[Phase]) -> Outcome:
    pool_rate = median([p.events_per_s for p in pools])
    floor_rate = median([p.events_per_s for p in floors])
    results = {"scenario": name, **guarantees(pools), "events_per_s": pool_rate, "floor_events_per_s": floor_rate,
               "ratio": ratio(pool_rate, floor_rate), "max_rss_mb": max(p.max_rss_mb for p in pools),
               "cpu_us_per_event": median([p.cpu_us_per_event for p in pools]),
               "floor_cpu_us_per_event": median([p.cpu_us_per_event for p in floors]),
               "settings": _settings(opts), "pool": [p.summary() for p in pools],
               "floor": [p.summary() for p in floors]}
    rows = [phase_row(p, f"pool {i}") for i, p in enumerate(pools)]
    rows += [phase_row(p, f"floor {i}") for i, p in enumerate(floors)]
    out = Outcome(results, PHASE_HEADER, rows)
    for p in pools + floors:
        out.notes += [f"{p.side}: {e}" for e in p.errors]
    return out


def _settings(opts: Options) -> dict[str, object]:
    return {"workers": opts.workers, "prefetch": opts.prefetch, "concurrency": opts.concurrency,
            "partitions": opts.partitions, "queue_type": opts.queue_type, "publishers": opts.publishers,
            "keys": opts.keys, "rounds": opts.rounds}


def saturate(opts: Options) -> Outcome:
    load = Load(events=opts.events or SATURATE_EVENTS, publishers=opts.publishers, keys=opts.keys)
    pools, floors = pairs(opts, load, "saturate")
    out = _outcome("saturate", opts, pools, floors)
    if all(p.kept_up for p in pools + floors):
        out.notes.append("both sides kept up with the publishers: the figures are the publish rate, "
                         "not the consumers' ceiling (add --publishers)")
    if opts.plots and plots.available():
        out.plots.append(plots.timelines(opts.out, "saturate.png", "saturate: completions/s (round 0)",
                                         {"pool": pools[0].timeline, "floor": floors[0].timeline}))
    return out


def drain(opts: Options) -> Outcome:
    load = Load(events=opts.events or DRAIN_EVENTS, publishers=opts.publishers, keys=opts.keys, preload=True)
    pools, floors = pairs(opts, load, "drain")
    # the same backlog on partitions as a broker restart leaves them: the guard re-routes all of it
    restarted = []
    for r in range(opts.rounds):
        with consumer("pool", opts, name=f"drain-restart{r}", after_restart=True) as (c, t):
            restarted.append(run_phase(c, t, load, "drain pool after broker restart"))
    out = _outcome("drain", opts, pools, floors)
    for key, value in guarantees(pools + restarted).items():
        out.results[key] = value
    rate_after = median([p.events_per_s for p in restarted])
    rerouted = sum(p.rerouted for p in restarted)
    events_after = sum(p.published for p in restarted)
    out.results["events_after_restart_per_s"] = rate_after
    out.results["ratio_after_restart"] = ratio(rate_after, out.results["floor_events_per_s"])
    out.results["rerouted"] = rerouted
    out.results["rerouted_per_event"] = round(rerouted / max(events_after, 1), 3)
    out.results["rerouted_on_clean_partitions"] = sum(p.rerouted for p in pools)
    out.results["drain_s"] = median([p.elapsed_s for p in pools])
    out.results["drain_after_restart_s"] = median([p.elapsed_s for p in restarted])
    out.results["floor_drain_s"] = median([p.elapsed_s for p in floors])
    out.results["first_completion_s"] = median([p.first_s for p in restarted])
    out.rows += [phase_row(p, f"pool after restart {i}") for i, p in enumerate(restarted)]
    out.notes.append(f"after a broker restart the ring-drift guard re-routed {rerouted:,} deliveries "
                     f"({out.results['rerouted_per_event']} per backlog event; the bar is <= 1) and the first "
                     f"reconcile finished {out.results['first_completion_s']:.1f}s after ready; on clean "
                     f"partitions it re-routed {out.results['rerouted_on_clean_partitions']}")
    if opts.plots and plots.available():
        out.plots.append(plots.timelines(opts.out, "drain.png", "drain: completions/s from ready (round 0)",
                                         {"pool": pools[0].timeline, "floor": floors[0].timeline}))
    return out
