"""PNG plots of a scenario's results (matplotlib, Agg backend: no display needed).

matplotlib is optional: on a benchmark host without it (wheels on PYTHONPATH, no pip)
``available()`` is False, the scenario warns once and writes results.json and the table
anyway. Every function takes plain lists and dicts and returns the file name it wrote.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Sequence

try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:  # pragma: no cover - depends on the host
    plt = None

LAT_BAR_MS = (5.0, 20.0)  # issue 4's latency bar: p50 <= 5 ms, p99 <= 20 ms


def available() -> bool:
    if plt is None:
        print("bench: matplotlib is not importable; skipping plots (results.json and the table are complete)",
              file=sys.stderr)
    return plt is not None


def _save(fig: Any, out: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def timelines(out: Path, name: str, title: str, series: dict[str, Sequence[tuple[float, float]]],
              ylabel: str = "events/s completed") -> str:
    """Completion rate over time, one line per consumer (pool, floor)."""
    fig, ax = plt.subplots(figsize=(8, 4))
    for label, pts in series.items():
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label, linewidth=1)
    ax.set_xlabel("seconds since start")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, out, name)


def latency_histogram(out: Path, name: str, latencies_ms: Sequence[float], marks: dict[str, float],
                      title: str, floor_ms: Sequence[float] = ()) -> str:
    """Histogram of end-to-end latencies on a log axis, with p50/p90/p99 and the bar marked
    (and the floor's, outlined, when given)."""
    fig, ax = plt.subplots(figsize=(8, 4))
    both = [*latencies_ms, *floor_ms]
    lo = max(min(both), 0.05)
    hi = max(max(both), lo * 2)
    edges = [lo * (hi / lo) ** (i / 60) for i in range(61)]
    ax.hist(latencies_ms, bins=edges, color="#4477aa", label="pool")
    if floor_ms:
        ax.hist(floor_ms, bins=edges, histtype="step", color="#222222", linewidth=1.2, label="floor (bare pika)")
        ax.legend(loc="upper right")
    ax.set_xscale("log")
    for label, v in marks.items():
        ax.axvline(v, linestyle="--", linewidth=1, color="#cc3311")
        ax.text(v, ax.get_ylim()[1] * 0.9, f" {label} {v:.1f} ms", rotation=90, va="top", fontsize=8)
    for bar in LAT_BAR_MS:
        ax.axvline(bar, linestyle=":", linewidth=1, color="grey")
    ax.set_xlabel("publish -> reconcile finished (ms, log scale; dotted: 5 / 20 ms bar)")
    ax.set_ylabel("reconciles")
    ax.set_title(title)
    return _save(fig, out, name)


def hot_keys(out: Path, name: str, events: Sequence[int], reconciles: Sequence[int], title: str) -> str:
    """Events vs reconciles for the hottest keys (the gap is what coalescing saved)."""
    fig, ax = plt.subplots(figsize=(8, 4))
    x = list(range(len(events)))
    ax.bar([i - 0.2 for i in x], events, width=0.4, label="events published")
    ax.bar([i + 0.2 for i in x], reconciles, width=0.4, label="reconciles")
    ax.set_yscale("log")
    ax.set_xlabel("key rank (hottest first)")
    ax.set_ylabel("count (log)")
    ax.set_title(title)
    ax.legend()
    return _save(fig, out, name)


def heatmaps(out: Path, name: str, rows: Sequence[int], cols: Sequence[int],
             panels: dict[str, list[list[float | None]]], title: str) -> str:
    """One heatmap per metric over the prefetch (rows) x concurrency (cols) grid, values written in."""
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    axes = axes if len(panels) > 1 else [axes]
    for ax, (label, grid) in zip(axes, panels.items()):
        vals = [[v if v is not None else float("nan") for v in r] for r in grid]
        reverse = "events" not in label  # high throughput is good; high latency is bad
        im = ax.imshow(vals, cmap="viridis_r" if reverse else "viridis", aspect="auto")
        ax.set_xticks(range(len(cols)), [str(c) for c in cols])
        ax.set_yticks(range(len(rows)), [str(r) for r in rows])
        ax.set_xlabel("--concurrency")
        ax.set_ylabel("--prefetch")
        ax.set_title(label)
        for i, r in enumerate(grid):
            for j, v in enumerate(r):
                if v is not None:
                    bright = (im.norm(v) < 0.4) if reverse else (im.norm(v) > 0.6)  # viridis' yellow end
                    ax.text(j, i, f"{v:,.0f}" if v >= 100 else f"{v:.1f}", ha="center", va="center",
                            color="black" if bright else "white", fontsize=9)
        fig.colorbar(im, ax=ax)
    fig.suptitle(title)
    return _save(fig, out, name)


def scale(out: Path, name: str, workers: Sequence[int], pool: Sequence[float], floor: Sequence[float],
          title: str) -> str:
    """Throughput vs worker processes, pool and floor, with pool/floor on a second axis."""
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(workers, pool, "o-", label="pool")
    ax.plot(workers, floor, "s--", label="floor (bare pika)")
    ax.set_xlabel("worker / consumer processes")
    ax.set_ylabel("events/s")
    ax.set_xticks(list(workers))
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(workers, [p / f if f else 0 for p, f in zip(pool, floor)], "^:", color="grey", label="pool / floor")
    ax2.set_ylabel("pool / floor")
    ax2.set_ylim(0, 1.2)
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="lower left")
    ax.set_title(title)
    return _save(fig, out, name)
