"""What a scenario leaves: ``results.json`` in ``--out DIR`` and a table on stdout.

``Outcome`` is what every scenario returns: the top-level figures (``scenario``, ``events``,
``lost``, ``overlaps``, ``events_per_s`` and, where measured, ``floor_events_per_s``,
``ratio``, ``p50_ms``, ``p99_ms``, ``max_rss_mb``, ``cpu_us_per_event``), the details under
their own keys, the table rows, the plot files and notes for the reader.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

REQUIRED = ("scenario", "events", "lost", "overlaps", "events_per_s")


@dataclass
class Outcome:
    results: dict[str, Any]
    header: list[str]
    rows: list[list[Any]]
    plots: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def violated(self) -> bool:
        """A guarantee broke while measuring: events lost, or one key reconciled twice at once."""
        return bool(self.results["lost"]) or bool(self.results["overlaps"])


def median(values: Sequence[float]) -> float:
    return round(statistics.median(values), 1) if values else 0.0


def ratio(pool: float, floor: float) -> float | None:
    return round(pool / floor, 3) if floor else None


def write(out: Path, outcome: Outcome) -> Path:
    missing = [k for k in REQUIRED if k not in outcome.results]
    assert not missing, f"results lack {missing}"
    path = out / "results.json"
    body = {**outcome.results, "plots": outcome.plots, "notes": outcome.notes}
    path.write_text(json.dumps(body, indent=2, default=str) + "\n")
    return path


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.2f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def table(header: list[str], rows: list[list[Any]]) -> str:
    cells = [header] + [[_cell(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render(outcome: Outcome, path: Path) -> str:
    r = outcome.results
    head = [f"scenario {r['scenario']}: {r['events']:,} events, lost {r['lost']}, overlaps {r['overlaps']}"]
    figures = [f"{k}={_cell(r[k])}" for k in ("events_per_s", "floor_events_per_s", "ratio", "p50_ms", "p99_ms",
                                                "max_rss_mb", "cpu_us_per_event") if r.get(k) is not None]
    head.append("  ".join(figures))
    lines = head + ["", table(outcome.header, outcome.rows), ""]
    lines += [f"note: {n}" for n in outcome.notes]
    lines.append(f"results: {path}" + (f"  plots: {', '.join(outcome.plots)}" if outcome.plots else ""))
    return "\n".join(lines)
