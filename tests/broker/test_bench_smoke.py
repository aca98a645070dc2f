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


@pytest.mark.broker
@pytest.mark.timeout(60)
def test_latency_smoke_reports_the_warm_up_apart(amqp_url, tmp_path):
    # Given the latency scenario at 500 events/s: 0.5 s of warm-up, then 2 s measured
    out = tmp_path / "latency"
    cmd = [sys.executable, "-m", "bench", "latency", "--url", amqp_url, "--rate", "500", "--warmup-s", "0.5",
           "--duration-s", "2", "--workers", "1", "--partitions", "4", "--publishers", "1", "--keys", "200",
           "--no-plots", "--out", str(out)]

    # When it runs
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=55)

    # Then every event of both parts is published and reconciled, and the latencies come in two parts
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "warm-up p99" in proc.stdout, proc.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["events"] == 1250 and results["lost"] == 0 and results["overlaps"] == 0
    assert results["warmup_s"] == 0.5
    for side in ("", "floor_"):
        assert 0 < results[side + "p50_ms"] <= results[side + "p99_ms"] <= results[side + "max_ms"]
        assert 0 < results[side + "warmup_p50_ms"] <= results[side + "warmup_p99_ms"] <= results[side + "warmup_max_ms"]
    assert results["pool"][0]["published"] == results["floor"][0]["published"] == 1250


def test_a_negative_warm_up_is_refused_naming_the_flag(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench", "latency", "--warmup-s", "-1", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "--warmup-s" in proc.stderr
