"""Unit tests of pool.metrics: worker counters, the supervisor's sum over workers, the text format, HTTP."""

from __future__ import annotations

import re
import urllib.error
import urllib.request

import pytest

from pool.messages import Metrics, decode
from pool.metrics import (
    CONFIRM_BUCKETS,
    CONTENT_TYPE,
    FAMILIES,
    Aggregate,
    MetricsReporter,
    MetricsServer,
    Snapshot,
    WorkerMetrics,
    render,
)

# One sample line of the text format 0.0.4: name, optional labels, value
SAMPLE = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="([^"\\]|\\.)*",?)*\})? (-?[0-9.e+-]+|\+Inf|NaN)$')


def samples(text: str) -> dict[str, float]:
    """``name{labels}`` -> value, checking every line is valid exposition format."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            continue
        assert SAMPLE.match(line), f"not exposition format: {line!r}"
        name, value = line.rsplit(" ", 1)
        out[name] = float(value)
    return out


def worker_with_traffic() -> WorkerMetrics:
    m = WorkerMetrics()
    for _ in range(3):
        m.added("deployments")
    m.started("deployments", 0.002, coalesced=2)
    m.reconciled("deployments", "success", 0.03, 0.031)
    m.reconciled("deployments", "error", 0.5, 0.6)
    m.retried("deployments")
    m.parked("deployments", "permanent")
    m.rerouted("deployments")
    m.handover("deployments", "acquired")
    m.confirmed(0.004)
    m.depth("deployments", 5)
    m.owned("deployments", 8)
    return m


def test_worker_counts_render_with_controller_runtime_names() -> None:
    # Given a worker that added, reconciled, retried, parked and re-routed
    m = worker_with_traffic()
    # When its snapshot is rendered as the supervisor would
    agg = Aggregate()
    agg.update(0, m.encode())
    got = samples(agg.render())
    # Then the client-go / controller-runtime names carry the counts, labelled by controller
    wq = 'controller="deployments",name="deployments"'
    assert got[f"workqueue_adds_total{{{wq}}}"] == 3
    assert got[f"workqueue_depth{{{wq}}}"] == 5
    assert got[f"workqueue_retries_total{{{wq}}}"] == 1
    assert got[f"workqueue_queue_duration_seconds_count{{{wq}}}"] == 1
    assert got[f"workqueue_work_duration_seconds_sum{{{wq}}}"] == pytest.approx(0.631)
    assert got['controller_runtime_reconcile_total{controller="deployments",result="success"}'] == 1
    assert got['controller_runtime_reconcile_total{controller="deployments",result="error"}'] == 1
    assert got['controller_runtime_reconcile_errors_total{controller="deployments"}'] == 1
    assert got['controller_runtime_reconcile_time_seconds_count{controller="deployments"}'] == 2
    assert got['ctlpool_events_coalesced_total{controller="deployments"}'] == 2
    assert got['ctlpool_parked_total{controller="deployments",reason="permanent"}'] == 1
    assert got['ctlpool_rerouted_total{controller="deployments"}'] == 1
    assert got['ctlpool_handovers_total{controller="deployments",direction="acquired"}'] == 1
    assert got['ctlpool_partitions_owned{controller="deployments"}'] == 8
    assert got["ctlpool_publish_confirm_seconds_count"] == 1


def test_histogram_buckets_are_cumulative_with_le_labels() -> None:
    # Given confirms of 0.4 ms, 4 ms, 4 ms and 20 s (beyond the last bucket)
    m = WorkerMetrics()
    for s in (0.0004, 0.004, 0.004, 20.0):
        m.confirmed(s)
    # When rendered
    text = render(Snapshot.decode(m.encode()))
    got = samples(text)
    # Then each bucket counts the observations <= its bound, +Inf counts all, sum and count agree
    assert got['ctlpool_publish_confirm_seconds_bucket{le="0.0005"}'] == 1
    assert got['ctlpool_publish_confirm_seconds_bucket{le="0.0025"}'] == 1
    assert got['ctlpool_publish_confirm_seconds_bucket{le="0.005"}'] == 3
    assert got['ctlpool_publish_confirm_seconds_bucket{le="10"}'] == 3
    assert got['ctlpool_publish_confirm_seconds_bucket{le="+Inf"}'] == 4
    assert got["ctlpool_publish_confirm_seconds_count"] == 4
    assert got["ctlpool_publish_confirm_seconds_sum"] == pytest.approx(20.0084)
    buckets = [line for line in text.splitlines() if line.startswith("ctlpool_publish_confirm_seconds_bucket")]
    assert len(buckets) == len(CONFIRM_BUCKETS) + 1
    # and a value equal to a bound falls in that bucket ("le")
    m2 = WorkerMetrics()
    m2.confirmed(0.005)
    assert samples(render(Snapshot.decode(m2.encode())))['ctlpool_publish_confirm_seconds_bucket{le="0.0025"}'] == 0
    assert samples(render(Snapshot.decode(m2.encode())))['ctlpool_publish_confirm_seconds_bucket{le="0.005"}'] == 1


def test_sum_over_live_workers() -> None:
    # Given two workers with their own counts and gauges
    a, b = worker_with_traffic(), worker_with_traffic()
    b.owned("deployments", 4)
    agg = Aggregate()
    # When both report
    agg.update(0, a.encode())
    agg.update(1, b.encode())
    got = samples(agg.render())
    # Then counters, gauges and histograms are summed
    assert got['workqueue_adds_total{controller="deployments",name="deployments"}'] == 6
    assert got['ctlpool_partitions_owned{controller="deployments"}'] == 12
    assert got["ctlpool_publish_confirm_seconds_count"] == 2


def test_a_newer_snapshot_replaces_the_older_one_of_the_same_worker() -> None:
    # Given a worker that reported once
    m = WorkerMetrics()
    m.added("c")
    agg = Aggregate()
    agg.update(0, m.encode())
    # When it counts more and reports again
    m.added("c")
    agg.update(0, m.encode())
    # Then the total is its latest count, not the sum of its reports
    assert samples(agg.render())['workqueue_adds_total{controller="c",name="c"}'] == 2


def test_counters_stay_monotonic_across_a_worker_restart() -> None:
    # Given worker slot 0 counted 5 adds and owned 8 partitions, then died
    old = WorkerMetrics()
    for _ in range(5):
        old.added("c")
    old.owned("c", 8)
    agg = Aggregate()
    agg.update(0, old.encode())
    agg.retire(0)
    after_death = samples(agg.render())
    # When its replacement (counting from zero) reports 2 adds and 3 partitions
    new = WorkerMetrics()
    new.added("c")
    new.added("c")
    new.owned("c", 3)
    agg.update(0, new.encode())
    got = samples(agg.render())
    # Then the counter continues from 5, while the dead worker's gauge is gone
    assert after_death['workqueue_adds_total{controller="c",name="c"}'] == 5
    assert 'ctlpool_partitions_owned{controller="c"}' not in after_death
    assert got['workqueue_adds_total{controller="c",name="c"}'] == 7
    assert got['ctlpool_partitions_owned{controller="c"}'] == 3


def test_supervisor_samples_and_unknown_families() -> None:
    # Given a snapshot from a newer worker with a family this supervisor does not know
    agg = Aggregate()
    agg.update(0, b'{"c": [["from_the_future_total", ["x"], 1], ["ctlpool_rerouted_total", ["c"], 2]], "g": [], "h": []}')
    # When rendered with the supervisor's own samples
    got = samples(agg.render([("ctlpool_worker_restarts_total", (), 3), ("ctlpool_workers", ("ready",), 2)]))
    # Then the known ones show, the unknown one is skipped
    assert got["ctlpool_worker_restarts_total"] == 3
    assert got['ctlpool_workers{state="ready"}'] == 2
    assert got['ctlpool_rerouted_total{controller="c"}'] == 2
    assert not any(k.startswith("from_the_future") for k in got)


def test_a_garbled_snapshot_is_ignored() -> None:
    # Given an aggregate with one good snapshot
    m = WorkerMetrics()
    m.added("c")
    agg = Aggregate()
    agg.update(0, m.encode())
    # When the same worker then sends garbage
    agg.update(0, b"\xff not json")
    # Then the good snapshot stays
    assert samples(agg.render())['workqueue_adds_total{controller="c",name="c"}'] == 1


def test_label_values_are_escaped() -> None:
    # Given a parked reason with a quote, a backslash and a newline in it
    m = WorkerMetrics()
    m.parked("c", 'bad "x"\\\nz')
    # When rendered
    text = render(Snapshot.decode(m.encode()))
    # Then the sample line is still valid exposition format
    line = next(x for x in text.splitlines() if x.startswith("ctlpool_parked_total{"))
    assert line == 'ctlpool_parked_total{controller="c",reason="bad \\"x\\"\\\\\\nz"} 1'
    samples(text)


def test_every_family_has_help_and_type() -> None:
    # Given nothing counted yet
    text = render(Snapshot({}, {}, {}))
    # Then each family still announces itself (dashboards see the names before traffic)
    for name, fam in FAMILIES.items():
        assert f"# HELP {name} " in text
        assert f"# TYPE {name} {fam.kind}\n" in text


def test_sampler_sets_gauges_at_snapshot_time() -> None:
    # Given a worker whose gauges come from a sampler
    m = WorkerMetrics()
    state = {"depth": 1}
    m.sampler = lambda wm: wm.depth("c", state["depth"])
    # When the state changes between snapshots
    first = samples(render(Snapshot.decode(m.encode())))
    state["depth"] = 7
    second = samples(render(Snapshot.decode(m.encode())))
    # Then each snapshot carries the value at that moment
    assert first['workqueue_depth{controller="c",name="c"}'] == 1
    assert second['workqueue_depth{controller="c",name="c"}'] == 7


def get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.headers["Content-Type"], r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read().decode()


def test_http_endpoints() -> None:
    # Given a server on a free port whose supervisor is alive but not ready
    state = {"live": True, "ready": False}
    server = MetricsServer("127.0.0.1", 0, metrics=lambda: "ctlpool_worker_restarts_total 0\n",
                           live=lambda: state["live"], ready=lambda: (state["ready"], "running: 1/2 workers ready"))
    server.start()
    base = f"http://127.0.0.1:{server.port}"
    try:
        # When scraped
        # Then /metrics answers in the text format, /livez 200, /readyz 503 with the summary
        assert get(base + "/metrics") == (200, CONTENT_TYPE, "ctlpool_worker_restarts_total 0\n")
        assert get(base + "/livez")[0] == 200
        assert get(base + "/readyz") == (503, "text/plain", "running: 1/2 workers ready\n")
        # and when ready / stalled they change
        state.update(ready=True, live=False)
        assert get(base + "/readyz")[0] == 200
        assert get(base + "/livez")[0] == 503
        assert get(base + "/nope")[0] == 404
    finally:
        server.close()


def test_a_taken_port_raises_at_start() -> None:
    # Given a port already in use
    first = MetricsServer("127.0.0.1", 0, metrics=str, live=lambda: True, ready=lambda: (True, ""))
    first.start()
    try:
        second = MetricsServer("127.0.0.1", first.port, metrics=str, live=lambda: True, ready=lambda: (True, ""))
        # When another server starts on it
        # Then it fails at once (the supervisor turns that into a one-line config error)
        with pytest.raises(OSError):
            second.start()
    finally:
        first.close()


def test_reporter_repeats_the_last_snapshot_when_the_sampler_breaks(caplog: pytest.LogCaptureFixture) -> None:
    # Given a reporter whose worker counted one add
    sent: list[bytes] = []
    m = WorkerMetrics()
    m.added("c")
    reporter = MetricsReporter(m, sent.append, worker=3)
    reporter.send_now()
    # When the gauge sampler starts raising, for two reports in a row
    def broken(_m: WorkerMetrics) -> None:
        raise RuntimeError("sampler bug")
    m.sampler = broken
    reporter.send_now()
    reporter.send_now()
    # Then every report still goes out (it is the worker's heartbeat), carrying the last good counts
    assert len(sent) == 3 and sent[1] == sent[2] == sent[0]
    assert isinstance(decode(sent[0]), Metrics)
    agg = Aggregate()
    agg.update(3, decode(sent[2]).payload)
    assert samples(agg.render())['workqueue_adds_total{controller="c",name="c"}'] == 1
    # and the failure is logged once, not once a second
    assert sum("metrics snapshot failed" in r.getMessage() for r in caplog.records) == 1
