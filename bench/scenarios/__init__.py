"""The scenarios, by name: each takes ``Options`` and returns a ``bench.report.Outcome``."""

from .cluster import cluster
from .grid import scale, sweep
from .latency import hotkeys, latency
from .throughput import drain, saturate

SCENARIOS = {"saturate": saturate, "drain": drain, "latency": latency, "hotkeys": hotkeys, "sweep": sweep,
             "scale": scale, "cluster": cluster}

HELP = {
    "saturate": "pool vs floor, publishers flat out: steady events/s and pool/floor",
    "drain": "pool vs floor on a preloaded backlog: time to empty, guard re-routes",
    "latency": "paced load (--rate, --warmup-s, --duration-s): publish -> reconcile finished p50/p90/p99/max",
    "hotkeys": "Zipf keys (--skew), slow controller (--sleep-ms): coalescing, per-key exclusivity",
    "sweep": "prefetch x concurrency grid: throughput and p99 heatmaps, a recommended setting",
    "scale": "pool vs floor at 1..--workers processes",
    "cluster": "the pool on the local 3-node cluster beside the single broker (saturate, latency), and the "
               "failover gap when the node it consumes from is SIGKILLed",
}

__all__ = ["HELP", "SCENARIOS"]
