"""The scenarios, by name: each takes ``Options`` and returns a ``bench.report.Outcome``."""

from .cluster import cluster
from .grid import scale, sweep
from .latency import hotkeys, latency
from .resize import partitions, resize
from .throughput import drain, saturate

SCENARIOS = {"saturate": saturate, "drain": drain, "latency": latency, "hotkeys": hotkeys, "sweep": sweep,
             "scale": scale, "cluster": cluster, "partitions": partitions, "resize": resize}

HELP = {
    "saturate": "pool vs floor, publishers flat out: steady events/s and pool/floor",
    "drain": "pool vs floor on a preloaded backlog: time to empty, guard re-routes",
    "latency": "paced load (--rate, --warmup-s, --duration-s): publish -> reconcile finished p50/p90/p99/max",
    "hotkeys": "Zipf keys (--skew), slow controller (--sleep-ms): coalescing, per-key exclusivity",
    "sweep": "prefetch x concurrency grid: throughput and p99 heatmaps, a recommended setting",
    "scale": "pool vs floor at 1..--workers processes",
    "cluster": "the pool on the local 3-node cluster beside the single broker (saturate, latency), and the "
               "failover gap when the node it consumes from is SIGKILLed",
    "partitions": "the broker's CPU at a paced load (--rate, default 2000/s) for 8, 16, 32, 64 partitions (--counts)",
    "resize": "a 50k backlog and 2000 events/s: grow 8 -> 64 then shrink back online; waits of moved and unmoved "
              "keys, the throughput dip, how long each resize took",
}

__all__ = ["HELP", "SCENARIOS"]
