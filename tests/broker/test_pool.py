"""The pool against the real broker: real supervisor and worker processes, real signals.

Every test runs ``ctlpool run`` as a subprocess on a topology of its own (unique prefix),
with controllers from tests/ctl_fixtures.py that record every reconcile to files.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from pool.supervisor import usable_cpus
from tests.ctl_fixtures import overlaps, read_records
from tests.helpers import Pool, ctlpool_cli, delete, get_all, publish_many, queue_depth, wait_until
from tests.load import PARTITIONS, Load, assert_none_lost, backlog, ok_records

@pytest.fixture
def rec_dir(tmp_path: Path) -> Path:
    d = tmp_path / "rec"
    d.mkdir()
    return d


def make_pool(amqp_url: str, prefix: str, tmp_path: Path, rec_dir: Path, *args: str,
              controllers: str = "tests.ctl_fixtures:Recorder", env: dict[str, str] | None = None,
              log_name: str = "pool.log") -> Pool:
    return Pool(amqp_url, prefix, controllers, "--workers", "2", "--partitions", str(PARTITIONS), *args,
                env={"CTLPOOL_TEST_RECORD_DIR": str(rec_dir), **(env or {})}, log_path=tmp_path / log_name)


def assert_ranges_covered(records: list[dict[str, Any]], per_key: dict[str, int]) -> None:
    """Without crashes each key's events arrive in order, so a reconcile that saw event n and
    covered c deliveries accounts for events n-c+1..n: together they must be exactly 1..N per key."""
    seen: dict[str, list[int]] = {}
    for r in ok_records(records):
        seen.setdefault(r["k"], []).extend(range(r["n"] - r["c"] + 1, r["n"] + 1))
    for key, count in per_key.items():
        assert sorted(seen.get(key, [])) == list(range(1, count + 1)), f"key {key}: events covered {seen.get(key)}"


def keyed_events(hot: int, hot_events: int, cold: int, **extra: Any) -> tuple[list[tuple[str, Any]], dict[str, int]]:
    """Interleaved events: ``hot`` keys with ``hot_events`` each, ``cold`` keys with one each; n counts per key."""
    events: list[tuple[str, Any]] = []
    per_key: dict[str, int] = {}
    for i in range(max(hot_events, 1)):
        for h in range(hot):
            if i < hot_events:
                per_key[f"hot{h}"] = per_key.get(f"hot{h}", 0) + 1
                events.append((f"hot{h}", {"n": per_key[f"hot{h}"], **extra}))
        for c in range(i * cold // hot_events if hot_events else 0, (i + 1) * cold // hot_events if hot_events else cold):
            per_key[f"cold{c}"] = 1
            events.append((f"cold{c}", {"n": 1, **extra}))
    return events, per_key


@pytest.mark.timeout(120)
@pytest.mark.parametrize("controller", ["rec", "recs"])
def test_per_key_exclusivity_and_coverage(amqp_url, prefix, tmp_path, rec_dir, controller):
    # Given a pool of 2 workers running a controller whose reconciles take a few ms
    refs = "tests.ctl_fixtures:Recorder" if controller == "rec" else "tests.ctl_fixtures:SyncRecorder"
    pool = make_pool(amqp_url, prefix, tmp_path, rec_dir, "--concurrency", "16", controllers=refs).start()
    try:
        pool.wait_ready()
        # When 20 hot keys get 50 events each and 2000 cold keys one each, interleaved
        events, per_key = keyed_events(hot=20, hot_events=50, cold=2000, sleep_ms=2)
        publish_many(amqp_url, prefix, controller, events)
        wait_until(lambda: backlog(amqp_url, prefix, controller) == 0 and
                   sum(r["c"] for r in ok_records(read_records(str(rec_dir)))) >= len(events),
                   timeout=90, what="all events reconciled")
    finally:
        assert pool.stop() == 0
    records = read_records(str(rec_dir))
    # Then no two reconciles of one key ever overlapped, in one worker or across both
    assert overlaps(records) == []
    assert len({r["pid"] for r in records}) == 2, "both workers took part"
    # and every event was covered by exactly one successful reconcile; nothing failed or parked
    assert sum(r["c"] for r in ok_records(records)) == len(events)
    assert_ranges_covered(records, per_key)
    assert queue_depth(amqp_url, f"{prefix}.{controller}.parked") == 0


@pytest.mark.timeout(90)
def test_events_for_a_busy_key_coalesce(amqp_url, prefix, tmp_path, rec_dir):
    # Given a pool whose reconcile of key "hot" is slow (1.5 s)
    pool = make_pool(amqp_url, prefix, tmp_path, rec_dir, "--prefetch", "200").start()
    try:
        pool.wait_ready()
        publish_many(amqp_url, prefix, "rec", [("hot", {"n": 1, "sleep_ms": 1500, "mark_start": True})])
        wait_until(lambda: any(r["r"] == "start" for r in read_records(str(rec_dir))), 10,
                   what="the first reconcile running")
        # When 99 more events for the same key arrive while it runs
        publish_many(amqp_url, prefix, "rec", [("hot", {"n": n}) for n in range(2, 101)])
        wait_until(lambda: sum(r.get("c", 0) for r in read_records(str(rec_dir))) >= 100, 30, what="100 events covered")
    finally:
        assert pool.stop() == 0
    records = [r for r in read_records(str(rec_dir)) if r["r"] != "start"]
    # Then they collapse into far fewer reconciles, all 100 deliveries acked, nothing parked
    assert len(records) <= 5, records
    assert sum(r["c"] for r in records) == 100
    assert records[-1]["n"] == 100, "the follow-up reconcile saw the latest event"
    assert overlaps(records) == []
    assert backlog(amqp_url, prefix) == 0
    assert queue_depth(amqp_url, f"{prefix}.rec.parked") == 0


@pytest.mark.timeout(120)
def test_backoff_retries_then_parks(amqp_url, prefix, tmp_path, rec_dir):
    # Given a controller with base 1 s, factor 2, jitter 10%, max 4 attempts
    pool = make_pool(amqp_url, prefix, tmp_path, rec_dir).start()
    try:
        pool.wait_ready()
        # When one key fails twice then succeeds, one always fails, one is Permanent and one is garbage
        publish_many(amqp_url, prefix, "rec", [("flaky", {"n": 1, "fail": 2}), ("doomed", {"n": 1, "fail": 99}),
                                               ("bad", {"n": 1, "permanent": True})])
        _publish_raw(amqp_url, f"{prefix}.rec", "garbage", b"{not json")
        publish_many(amqp_url, prefix, "rec", [("after-garbage", {"n": 1})])
        wait_until(lambda: queue_depth(amqp_url, f"{prefix}.rec.parked") >= 3, 60, what="3 parked")
        wait_until(lambda: any(r["k"] == "flaky" and r["r"] == "ok" for r in read_records(str(rec_dir))), 30)
    finally:
        assert pool.stop() == 0
    records = read_records(str(rec_dir))
    flaky = sorted((r for r in records if r["k"] == "flaky"), key=lambda r: r["s"])
    # Then "flaky" ran k+1 = 3 times, with gaps following 1 s then 2 s (±10% jitter, ±0.5 s tier resolution)
    assert [r["r"] for r in flaky] == ["error", "error", "ok"]
    gaps = [(b["s"] - a["e"]) / 1e9 for a, b in zip(flaky, flaky[1:])]
    assert 0.4 <= gaps[0] <= 1.9, gaps
    assert 1.3 <= gaps[1] <= 3.0, gaps
    # and "doomed" ran max_attempts = 4 times, "bad" once, the garbage never reached a reconcile
    assert [r["a"] for r in sorted((r for r in records if r["k"] == "doomed"), key=lambda r: r["s"])] == [0, 1, 2, 3]
    assert sum(1 for r in records if r["k"] == "bad") == 1
    assert not any(r["k"] == "garbage" for r in records)
    assert any(r["k"] == "after-garbage" and r["r"] == "ok" for r in records), "the worker kept going"
    parked = {p.headers["x-ctlpool-reason"]: (p, b) for _, p, b in get_all(amqp_url, f"{prefix}.rec.parked")}
    assert set(parked) == {"max-attempts", "permanent", "undecodable"}
    assert "transient failure 4" in parked["max-attempts"][0].headers["x-ctlpool-error"]
    assert "is invalid" in parked["permanent"][0].headers["x-ctlpool-error"]
    assert parked["undecodable"][1] == b"{not json", "the body is parked untouched"
    assert all("x-death" not in p.headers for p, _ in parked.values())


@pytest.mark.timeout(90)
def test_requeue_after_including_longer_than_largest_tier(amqp_url, prefix, tmp_path, rec_dir):
    # Given delay tiers of 1 s and 2 s only
    pool = make_pool(amqp_url, prefix, tmp_path, rec_dir, "--tiers-s", "1,2").start()
    try:
        pool.wait_ready()
        # When one key asks to come back in 1.5 s and another in 5 s (> the largest tier)
        now = time.time()
        publish_many(amqp_url, prefix, "rec", [("short", {"n": 1, "requeue_after": 1.5, "t0": now}),
                                               ("long", {"n": 1, "requeue_after": 5, "t0": now})])
        wait_until(lambda: sum(1 for r in read_records(str(rec_dir)) if r["r"] == "ok") >= 2, 30)
    finally:
        assert pool.stop() == 0
    records = read_records(str(rec_dir))
    # Then each was reconciled twice, the second time after the delay (±0.5 s, the smallest tier / 2)
    for key, delay in (("short", 1.5), ("long", 5.0)):
        first, second = sorted((r for r in records if r["k"] == key), key=lambda r: r["s"])
        assert (first["r"], second["r"]) == ("requeue", "ok")
        gap = (second["s"] - first["e"]) / 1e9
        assert delay - 0.6 <= gap <= delay + 1.0, (key, gap)
    assert backlog(amqp_url, prefix, tiers=(1, 2)) == 0


def _publish_raw(url: str, exchange: str, key: str, body: bytes) -> None:
    import pika

    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        ch.basic_publish(exchange, key, body, pika.BasicProperties(delivery_mode=2), mandatory=True)
    finally:
        conn.close()


@pytest.mark.timeout(150)
def test_sigkill_worker_mid_load_loses_nothing(amqp_url, prefix, tmp_path, rec_dir):
    # Given a loaded pool
    pool = make_pool(amqp_url, prefix, tmp_path, rec_dir).start()
    try:
        pool.wait_ready()
        with Load(amqp_url, prefix, rate=1000) as load:
            load.flow(2000)
            # When a worker is SIGKILLed mid-load, twice
            for _ in range(2):
                victim = pool.worker_pids()[0]
                os.kill(victim, signal.SIGKILL)
                wait_until(lambda: victim not in pool.worker_pids() and len(pool.worker_pids()) == 2, 20,
                           what="worker restarted")
                load.flow(2000)
        wait_until(lambda: backlog(amqp_url, prefix) == 0, 60, what="backlog drained")
    finally:
        assert pool.stop() == 0
    # Then the supervisor restarted it, and every event is reconciled, none lost, no overlap
    logs = pool.logs()
    assert sum(1 for entry in logs if "died" in entry["msg"] and "restarting" in entry["msg"]) == 2
    records = read_records(str(rec_dir))
    assert_none_lost(records, load.per_key)
    assert overlaps(records) == []
    assert backlog(amqp_url, prefix) == 0, "nothing left unacked after the drain"
    assert queue_depth(amqp_url, f"{prefix}.rec.parked") == 0


@pytest.mark.timeout(150)
def test_sigterm_drains_under_load_and_restart_finishes(amqp_url, prefix, tmp_path, rec_dir):
    # Given a pool working through a backlog of slow-ish events
    pool = make_pool(amqp_url, prefix, tmp_path, rec_dir, "--drain-timeout-s", "20", "--concurrency", "8").start()
    pool.wait_ready()
    events, per_key = keyed_events(hot=10, hot_events=100, cold=15000, sleep_ms=10)
    publish_many(amqp_url, prefix, "rec", events)
    wait_until(lambda: len(read_records(str(rec_dir))) >= 500, 30, what="the pool working through the backlog")
    # When it gets SIGTERM mid-way
    t = time.monotonic()
    code = pool.stop(timeout=40)
    drained_in = time.monotonic() - t
    # Then it exits 0 within the drain time, having left the rest on the broker
    assert code == 0
    assert drained_in < 25
    records = read_records(str(rec_dir))
    left = backlog(amqp_url, prefix)
    assert left > 0, "the test needs work left over at SIGTERM"
    # and a restarted pool finishes the rest: nothing lost, nothing reconciled twice at once
    pool2 = make_pool(amqp_url, prefix, tmp_path, rec_dir, log_name="pool2.log").start()
    try:
        pool2.wait_ready()
        wait_until(lambda: backlog(amqp_url, prefix) == 0, 90, what="rest drained")
    finally:
        assert pool2.stop() == 0
    # (the broker did not restart, so the partitions are still marked clean: no re-routing needed)
    assert not [e for e in pool2.logs() if "re-routing" in e["msg"]], "guard ran on clean partitions"
    records = read_records(str(rec_dir))
    assert overlaps(records) == []
    # each event covered exactly once, per key (a drain redelivers nothing twice)
    covered: dict[str, int] = {}
    for r in ok_records(records):
        covered[r["k"]] = covered.get(r["k"], 0) + r["c"]
    assert covered == per_key
    assert queue_depth(amqp_url, f"{prefix}.rec.parked") == 0


@pytest.mark.timeout(60)
def test_broker_unreachable_at_start_is_a_clear_retry_loop(prefix, tmp_path, rec_dir):
    # Given a URL where nothing listens
    pool = Pool("amqp://guest:secret@127.0.0.1:1/%2F", prefix, "tests.ctl_fixtures:Recorder", "--log-format", "json",
                env={"CTLPOOL_TEST_RECORD_DIR": str(rec_dir)}, log_path=tmp_path / "pool.log").start()
    # When it has had time to try a few times
    wait_until(lambda: sum(1 for e in pool.logs() if "retrying" in e.get("msg", "")) >= 2, 30, what="2 retries")
    assert pool.stop(timeout=10) in (0, -signal.SIGTERM, 143)
    text = (tmp_path / "pool.log").read_text()
    # Then it logged one-line retries naming the broker (password redacted) and how to start it; no traceback
    assert "Traceback" not in text
    assert "secret" not in text
    first = next(e for e in pool.logs() if "retrying" in e["msg"])
    assert "127.0.0.1:1" in first["msg"] and "rabbitmq-server -detached" in first["msg"]


@pytest.mark.timeout(120)
def test_events_that_kill_their_worker_are_parked_and_the_pool_lives(amqp_url, prefix, tmp_path, rec_dir):
    # Given a pool, and two events whose reconciles kill the worker process every time, one
    # after the other, in one worker slot: 6 deaths within a minute, more than the crash-loop guard's 5
    pool = make_pool(amqp_url, prefix, tmp_path, rec_dir, "--workers", "1").start()
    try:
        pool.wait_ready()
        for n, key in enumerate(("poison1", "poison2"), 1):
            publish_many(amqp_url, prefix, "rec", [(key, {"n": 1, "crash": True})])
            # When each has killed its worker max-deliveries (3) times
            wait_until(lambda: queue_depth(amqp_url, f"{prefix}.rec.parked") >= n, 90, what=f"{key} parked")
        # Then each is parked with the reason, the pool is still up and keeps reconciling
        publish_many(amqp_url, prefix, "rec", [("fine", {"n": 1})])
        wait_until(lambda: any(r["k"] == "fine" for r in read_records(str(rec_dir))), 30, what="pool still works")
        assert pool.proc.poll() is None
    finally:
        assert pool.stop() == 0
    # exactly those events (a worker killed between re-routing a copy and acking the original may
    # leave two copies of one; both carry its count): only their own deaths were counted
    parked = get_all(amqp_url, f"{prefix}.rec.parked")
    assert 2 <= len(parked) <= 4, [p.headers for _, p, _ in parked]
    assert {p.headers["x-ctlpool-key"] for _, p, _ in parked} == {"poison1", "poison2"}
    for _, props, body in parked:
        assert props.headers["x-ctlpool-reason"] == "too-many-deliveries"
        assert b'"crash":true' in body
    deaths = [e for e in pool.logs() if e["logger"] == "ctlpool.supervisor" and "died" in e["msg"]]
    assert len(deaths) == 6, [e["msg"] for e in deaths]  # 3 each (--max-deliveries); the crash-loop guard stayed out


@pytest.mark.timeout(60)
def test_crash_loop_gives_up_with_a_clear_exit(amqp_url, prefix, tmp_path, rec_dir):
    # Given a controller whose worker dies at once, every time
    pool = make_pool(amqp_url, prefix, tmp_path, rec_dir, controllers="tests.ctl_fixtures:CrashOnStart").start()
    # When the supervisor has restarted it with backoff a few times
    code = pool.proc.wait(45)
    # Then it exits with the crash-loop code and says why in one line
    assert code == 3
    msgs = [e["msg"] for e in pool.logs()]
    assert any("died 5 times within 60s" in m and "giving up" in m for m in msgs), msgs
    restarts = [m for m in msgs if "restarting in" in m]
    delays = [float(m.split("restarting in ")[1].rstrip("s")) for m in restarts]
    assert delays == sorted(delays) and delays[0] < delays[-1], f"backoff grows: {delays}"


@pytest.mark.timeout(60)
def test_reconcile_timeout_fails_the_attempt(amqp_url, prefix, tmp_path, rec_dir):
    # Given a 1 s reconcile timeout and at most 2 attempts
    pool = make_pool(amqp_url, prefix, tmp_path, rec_dir, "--reconcile-timeout-s", "1",
                     env={"CTLPOOL_TEST_MAX_ATTEMPTS": "2"}).start()
    try:
        pool.wait_ready()
        # When a reconcile takes 3 s
        publish_many(amqp_url, prefix, "rec", [("stuck", {"n": 1, "sleep_ms": 3000})])
        wait_until(lambda: queue_depth(amqp_url, f"{prefix}.rec.parked") == 1, 30, what="parked")
    finally:
        assert pool.stop() == 0
    # Then each attempt was cut off, retried once, and parked saying so
    [(_, props, _)] = get_all(amqp_url, f"{prefix}.rec.parked")
    assert props.headers["x-ctlpool-reason"] == "max-attempts"
    assert "reconcile exceeded 1s" in props.headers["x-ctlpool-error"]
    assert not [r for r in read_records(str(rec_dir)) if r["r"] != "cancelled"], "the cancelled reconciles never finished"


@pytest.mark.timeout(180)
def test_sighup_rolls_workers_one_at_a_time_without_loss(amqp_url, prefix, tmp_path, rec_dir):
    # Given a loaded pool
    pool = make_pool(amqp_url, prefix, tmp_path, rec_dir).start()
    try:
        pool.wait_ready()
        before = set(pool.worker_pids())
        with Load(amqp_url, prefix, rate=500) as load:
            load.flow(500)
            # When it gets SIGHUP, and again while that rolling restart is under way
            pool.signal(signal.SIGHUP)
            wait_until(lambda: len(set(pool.worker_pids()) - before) >= 1, 60, what="the first worker replaced")
            pool.signal(signal.SIGHUP)
            seen = set(before)

            def rolled_twice() -> bool:
                now = set(pool.worker_pids())
                seen.update(now)
                return len(now) == 2 and len(seen) >= 6 and not now & before  # 2 + 2 + 2 processes
            wait_until(rolled_twice, 120, interval=0.05, what="both workers replaced twice")
            load.flow(500)
        wait_until(lambda: backlog(amqp_url, prefix) == 0, 60, what="drained")
    finally:
        assert pool.stop() == 0
    # Then the workers were replaced one after the other, nothing lost, nothing overlapped
    msgs = [e["msg"] for e in pool.logs()]
    assert sum("SIGHUP: rolling restart" in m for m in msgs) == 2  # the second SIGHUP was not dropped
    assert any("another rolling restart follows" in m for m in msgs)
    assert not any("died" in m for m in msgs), "a rolled worker is not a crash"
    records = read_records(str(rec_dir))
    assert overlaps(records) == []
    assert_none_lost(records, load.per_key)


@pytest.mark.timeout(180)
def test_a_partition_that_loses_its_consumer_is_consumed_again(amqp_url, prefix, tmp_path, rec_dir):
    # Given a pool of 2 workers consuming every partition
    pool = make_pool(amqp_url, prefix, tmp_path, rec_dir).start()
    try:
        pool.wait_ready()
        # When an operator deletes one partition queue (the broker cancels its consumer; the
        # worker's connection stays up) and then re-creates it with `ctlpool topology`
        victim = f"{prefix}.rec.p001"
        delete(amqp_url, [victim], [])
        wait_until(lambda: any("does not exist" in line.get("msg", "") for line in pool.logs()), 30,
                   what="the worker notices, restarts its session, finds the queue missing")

        def reconciled(keys: set[str]) -> bool:
            return keys <= {r["k"] for r in ok_records(read_records(str(rec_dir)))}

        # Then while the queue is missing the other partitions are still served
        # (the exchange routes around a deleted queue)
        publish_many(amqp_url, prefix, "rec", [(f"a{i}", {"n": 1}) for i in range(200)])
        wait_until(lambda: reconciled({f"a{i}" for i in range(200)}), 60, what="keys reconciled meanwhile")
        assert any("does not exist" in line.get("msg", "") for line in pool.logs())
        made = ctlpool_cli(amqp_url, "topology", "rec", "--prefix", prefix, "--partitions", str(PARTITIONS))
        assert made.returncode == 0, made.stderr
        # And once it is re-created, events of every partition are reconciled, its own included
        publish_many(amqp_url, prefix, "rec", [(f"b{i}", {"n": 1}) for i in range(200)])
        wait_until(lambda: backlog(amqp_url, prefix) == 0 and reconciled({f"b{i}" for i in range(200)}), 60,
                   what="all keys reconciled after the re-creation")
        assert queue_depth(amqp_url, victim) == 0
        # And the worker said what happened
        assert any("lost its consumer (consumer cancelled by the broker)" in line.get("msg", "")
                   for line in pool.logs())
    finally:
        assert pool.stop() == 0


@pytest.mark.timeout(120)
def test_workers_are_pinned_only_when_the_broker_is_elsewhere(amqp_url, prefix, tmp_path, rec_dir):
    # Given the broker on this host (the test broker is local)
    cpus = usable_cpus()
    affinities: dict[str, list[list[int]]] = {}
    for mode in ("auto", "true"):
        # When the pool starts with --pin auto (the default), then with --pin true
        args = () if mode == "auto" else ("--pin", "true")
        pool = make_pool(amqp_url, prefix, tmp_path, rec_dir, *args, log_name=f"pool-{mode}.log").start()
        try:
            pool.wait_ready()
            affinities[mode] = sorted(psutil.Process(pid).cpu_affinity() for pid in pool.worker_pids())
        finally:
            assert pool.stop() == 0
        msgs = [e["msg"] for e in pool.logs()]
        if mode == "auto":
            # Then auto leaves the workers free to use every CPU, and says why
            assert any(m.startswith("workers not pinned: the broker runs on this host") for m in msgs), msgs
            assert affinities[mode] == [cpus, cpus]
        else:
            # and --pin true pins worker i to the i-th usable CPU
            assert "workers pinned to CPUs: --pin true" in msgs, msgs
            assert affinities[mode] == sorted([[cpus[0]], [cpus[1 % len(cpus)]]])
