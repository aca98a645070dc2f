"""What every scenario shares: the options, a consumer on a fresh topology, pool-vs-floor pairs.

Data flow: the CLI fills ``Options``; a scenario builds ``Load``s and asks ``consumer(...)``
for the pool (``PoolProcess``) or the floor (``Floor``) on a topology of its own, declared
on entry and deleted on exit (a pool is drained with SIGTERM first); ``run_phase`` measures
each load. ``pairs`` runs pool and floor under the same load, alternating which goes first
in each round, so a slow minute on the shared machine hurts both sides alike.
"""

from __future__ import annotations

import shutil
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from .. import broker
from ..broker import Target
from ..floor import Floor
from ..load import Load
from ..measure import Phase, run_phase
from ..poolproc import PoolOptions, PoolProcess


@dataclass(frozen=True)
class Options:
    """Flags of ``python -m bench``; ``None`` means the scenario's own default."""

    url: str
    out: Path
    workers: int
    prefetch: int
    concurrency: int
    partitions: int
    queue_type: str
    publishers: int
    keys: int
    rounds: int
    plots: bool
    keep_records: bool
    events: int | None = None
    duration_s: float | None = None
    rate: float | None = None
    warmup_s: float = 0.0
    skew: float = 1.1
    sleep_ms: float | None = None  # Sleepy's reconcile time; None: the scenario's default
    prefetch_grid: tuple[int, ...] = (10, 50, 200)
    concurrency_grid: tuple[int, ...] = (8, 64)
    counts: tuple[int, ...] | None = None
    scale_load: str = "saturate"

    def target(self, prefix: str | None = None) -> Target:
        return Target(self.url, prefix or broker.unique_prefix(), self.partitions, self.queue_type)


@contextmanager
def consumer(kind: str, opts: Options, *, name: str, workers: int | None = None, prefetch: int | None = None,
             concurrency: int | None = None, controller: str = "Noop", target: Target | None = None,
             after_restart: bool = False, latency: bool = False) -> Iterator[tuple[Any, Target]]:
    """The pool or the floor on ``target`` (a fresh one unless given), cleaned up on exit.

    ``after_restart``: the partitions start as after a broker restart (no clean markers), so
    the pool's ring-drift guard re-routes the backlog it finds. ``latency``: the floor keeps
    per-event latencies too (the pool always does)."""
    own = target is None
    t = target or opts.target()
    workers = workers or opts.workers
    prefetch = prefetch or opts.prefetch
    if own:
        broker.declare(t)
    if after_restart:
        broker.forget_clean(t)
    c: Any
    if kind == "pool":
        c = PoolProcess(t, PoolOptions(workers, prefetch, concurrency or opts.concurrency, controller,
                                       opts.sleep_ms or 0.0), opts.out, name)
    else:
        c = Floor(t, workers, prefetch, latency=latency)
    try:
        yield c, t
    finally:
        if kind == "pool":
            code = c.stop()
            if code != 0:
                print(f"bench: pool {name} exited with {code}; see {c.log_path}", file=sys.stderr)
            if not opts.keep_records:
                shutil.rmtree(c.record_dir, ignore_errors=True)
        else:
            c.close()
        if own:
            broker.delete_or_warn(t)


def pairs(opts: Options, load: Load, label: str, workers: int | None = None,
          latency: bool = False) -> tuple[list[Phase], list[Phase]]:
    """Pool and floor under ``load``, ``opts.rounds`` times each, alternating who goes first."""
    pools: list[Phase] = []
    floors: list[Phase] = []
    for r in range(opts.rounds):
        for kind in (("pool", "floor") if r % 2 == 0 else ("floor", "pool")):
            with consumer(kind, opts, name=f"{label}-{kind}{r}", workers=workers, latency=latency) as (c, t):
                ph = run_phase(c, t, load, f"{label} {kind}")
            (pools if kind == "pool" else floors).append(ph)
    return pools, floors


def guarantees(phases: list[Phase]) -> dict[str, int]:
    """Totals of what the pool phases checked: events, lost, overlaps, duplicates, parked."""
    return {"events": sum(p.published for p in phases), "lost": sum(p.lost for p in phases),
            "overlaps": sum(p.overlaps for p in phases), "duplicates": sum(p.duplicates for p in phases),
            "parked": sum(p.parked for p in phases)}


def phase_row(ph: Phase, label: str) -> list[Any]:
    return [label, ph.published, ph.events_per_s, ph.publish_per_s, ph.kept_up, ph.elapsed_s, ph.cpu_us_per_event,
            ph.max_rss_mb if ph.side == "pool" else None, ph.lost if ph.side == "pool" else None,
            ph.overlaps if ph.side == "pool" else None]


PHASE_HEADER = ["run", "events", "events/s", "publish/s", "kept up", "elapsed s", "cpu us/ev", "max rss MB", "lost",
                "overlaps"]
