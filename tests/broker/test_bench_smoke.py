"""The bench runs end to end and checks its own guarantees (tiny sizes: a smoke test, not a benchmark).

``python -m bench saturate`` is run as a subprocess against the real broker: a real pool
(``ctlpool run``) and the bare-pika floor under the same publishers, each on a prefix of its
own that the bench deletes afterwards.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import ROOT, exists

REQUIRED = ("scenario", "events", "lost", "overlaps", "events_per_s", "floor_events_per_s", "ratio", "max_rss_mb")


@pytest.mark.broker
@pytest.mark.timeout(60)
def test_saturate_smoke(amqp_url, tmp_path):
    # Given the bench, sized down to one worker, four partitions and 2,000 events
    out = tmp_path / "saturate"
    cmd = [sys.executable, "-m", "bench", "saturate", "--url", amqp_url, "--events", "2000", "--workers", "1",
           "--partitions", "4", "--publishers", "1", "--keys", "200", "--no-plots", "--out", str(out)]

    # When it runs
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=55)

    # Then it succeeds, prints its table, and results.json says nothing was lost or overlapped
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "scenario saturate" in proc.stdout and "floor 0" in proc.stdout, proc.stdout
    results = json.loads((out / "results.json").read_text())
    assert all(k in results for k in REQUIRED), sorted(results)
    assert results["scenario"] == "saturate"
    assert results["events"] == 2000
    assert results["lost"] == 0
    assert results["overlaps"] == 0
    assert results["events_per_s"] > 0 and results["floor_events_per_s"] > 0
    # and both phases' prefixes are gone from the broker
    for phase in results["pool"] + results["floor"]:
        assert phase["published"] == 2000
    for prefix in {p["prefix"] for p in results["pool"] + results["floor"]}:
        assert not exists(amqp_url, "exchange", f"{prefix}.bench")
        assert not exists(amqp_url, "queue", f"{prefix}.bench.p000")
