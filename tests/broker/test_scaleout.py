"""Several supervisors on this machine as distinct hosts (``--node-id``) sharing one controller.

Every scenario runs under continuous publishing (hot and cold keys) and asserts: no two
reconciles of one key ever overlapped (records of all processes, CLOCK_MONOTONIC), every
published event was covered by a successful reconcile (none lost, nothing parked), and,
once settled, partitions are balanced (each live worker within ±1 of its share).
"""

from __future__ import annotations

import os
import signal
import subprocess

import pytest

from tests.ctl_fixtures import overlaps, read_records
from tests.helpers import publish_many, read_json_log, wait_until
from tests.hosts import TIMEOUT, Hosts
from tests.load import Load
from tests.ring import Ring


@pytest.fixture
def cluster(amqp_url, prefix, tmp_path):
    c = Hosts(amqp_url, prefix, tmp_path)
    yield c
    c.shutdown()


@pytest.mark.timeout(300)
def test_scale_out_1_2_3_then_in_to_1(cluster, amqp_url, prefix):
    # Given one host under continuous load
    cluster.start("hostA").wait_ready()
    with Load(amqp_url, prefix, rate=600) as load:
        cluster.wait_balanced(2, "1 host")
        # When a second and a third host join
        cluster.start("hostB")
        cluster.wait_balanced(4, "join 1->2 hosts")
        cluster.start("hostC")
        cluster.wait_balanced(6, "join 2->3 hosts")
        # and then two leave with clean stops
        cluster.stop("hostC")
        cluster.wait_balanced(4, "leave 3->2 hosts")
        cluster.stop("hostB")
        cluster.wait_balanced(2, "leave 2->1 host")
        load.flow(600)
    # Then nothing overlapped, nothing was lost, and each step settled balanced
    records = cluster.check(load)
    assert len({r["pid"] for r in records}) >= 5, "all hosts' workers took part"


@pytest.mark.timeout(240)
def test_sigkill_whole_host_is_taken_over(cluster, amqp_url, prefix):
    # Given two hosts under load
    cluster.start("hostA").wait_ready()
    cluster.start("hostB").wait_ready()
    with Load(amqp_url, prefix, rate=600) as load:
        cluster.wait_balanced(4, "2 hosts")
        # When host B is SIGKILLed, supervisor and workers at once
        cluster.kill("hostB")
        # Then host A owns everything within the heartbeat timeout plus a few seconds
        took = cluster.wait_balanced(2, "host killed", timeout=TIMEOUT + 15)
        assert took <= TIMEOUT + 6
        load.flow(600)
    cluster.check(load)


@pytest.mark.timeout(300)
def test_kill_workers_repeatedly_during_rebalance(cluster, amqp_url, prefix):
    # Given one host under load, and a second joining
    a = cluster.start("hostA")
    a.wait_ready()
    with Load(amqp_url, prefix, rate=600) as load:
        b = cluster.start("hostB")
        # When workers of both hosts are SIGKILLed again and again while partitions move
        killed = 0
        for i in range(6):
            load.flow(400)
            victims = (a if i % 2 else b).worker_pids()
            if victims:
                os.kill(victims[i % len(victims)], signal.SIGKILL)
                killed += 1
        assert killed >= 4
        # Then the supervisors restart them and the cluster settles balanced
        cluster.wait_balanced(4, "after repeated worker kills", timeout=60)
        load.flow(600)
    cluster.check(load)


@pytest.mark.timeout(240)
def test_handover_waits_for_a_long_reconcile(cluster, amqp_url, prefix):
    # Given one host reconciling 24 keys slowly (5 s each)
    a = cluster.start("hostA")
    a.wait_ready()
    keys = [f"slow{i}" for i in range(24)]
    publish_many(amqp_url, prefix, "rec", [(k, {"n": 1, "sleep_ms": 5000, "mark_start": True}) for k in keys])
    wait_until(lambda: sum(1 for r in read_records(str(cluster.rec)) if r["r"] == "start") == len(keys), 20,
               what="slow reconciles started")
    pids_a = set(a.worker_pids())
    # When a second host joins (partitions must move while their reconciles run) and the keys get new events
    cluster.start("hostB").wait_ready()
    publish_many(amqp_url, prefix, "rec", [(k, {"n": 2}) for k in keys])
    cluster.wait_balanced(4, "join during long reconciles", timeout=60)
    wait_until(lambda: sum(1 for r in read_records(str(cluster.rec)) if r["r"] == "ok") >= 2 * len(keys), 60,
               what="follow-ups reconciled")
    pids_b = set(cluster.hosts["hostB"].worker_pids())
    for node in list(cluster.hosts):
        cluster.stop(node)
    records = read_records(str(cluster.rec))
    # Then no reconcile overlapped, and some keys' follow-ups ran on host B after host A's slow reconcile ended
    assert overlaps(records) == []
    moved = []
    for k in keys:
        done = sorted((r for r in records if r["k"] == k and r["r"] == "ok"), key=lambda r: r["s"])
        assert [r["n"] for r in done][-1] == 2, k
        slow = next(r for r in done if r["n"] == 1)
        follow = done[-1]
        if slow["pid"] in pids_a and follow["pid"] in pids_b:
            assert follow["s"] >= slow["e"]
            moved.append(k)
    assert moved, "no slow key's partition moved to host B; the test did not exercise a handover"


RING_QUEUES = 64


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=120)


def restart_broker_app() -> None:
    _rabbitmqctl("stop_app")
    _rabbitmqctl("start_app")
    _rabbitmqctl("await_startup")


@pytest.mark.timeout(420)
def test_broker_restarts_under_load(amqp_url, prefix, tmp_path):
    # Given two hosts under load (the publisher reconnects and re-sends unconfirmed batches), on
    # 64 quorum partitions: the shape whose ring RabbitMQ 3.10 reshuffles on restart
    cluster = Hosts(amqp_url, prefix, tmp_path, partitions=64)
    try:
        _broker_restarts_under_load(cluster, amqp_url, prefix)
    finally:
        cluster.shutdown()


def _broker_restarts_under_load(cluster: Hosts, amqp_url: str, prefix: str) -> None:
    cluster.start("hostA").wait_ready()
    cluster.start("hostB").wait_ready()
    with Load(amqp_url, prefix, rate=600) as load:
        cluster.wait_balanced(4, "before broker restarts")
        # When the broker's app is restarted twice (the consistent-hash ring may reshuffle each time)
        for i in range(2):
            load.flow(1200)
            restart_broker_app()
            cluster.wait_balanced(4, f"after broker restart {i + 1}", timeout=90)
        load.flow(1200)
    # Then every event was reconciled once settled, none overlapping, none lost
    records = cluster.check(load, drain_timeout=120)
    partitions_of: dict[str, set[int]] = {}
    for r in records:
        if r["k"].startswith("hot"):
            partitions_of.setdefault(r["k"], set()).add(r["p"])
    moved = sorted(k for k, ps in partitions_of.items() if len(ps) > 1)
    print(f"[ring] hot keys reconciled from more than one partition (the ring moved them): {moved}")
    rerouted = [e for node in ("hostA", "hostB") for e in read_json_log(cluster.tmp / f"{node}.log")
                if "ring-drift guard re-routed" in e.get("msg", "")]
    total = sum(int(e['msg'].split('re-routed ')[1].split()[0]) for e in rerouted)
    print(f"[reroute] guard messages: {len(rerouted)}; re-routed events over 2 restarts: {total}")
    assert load.retried_batches >= 1, "the broker restarts really interrupted publishing"
    assert total > 0, "after a broker restart the partitions' backlog was re-routed (clean markers gone)"


@pytest.mark.timeout(300)
def test_ring_moves_keys_across_broker_restart(amqp_url, prefix):
    """The hazard the ring-drift guard exists for, shown on this broker (DESIGN fact 1)."""
    # Given a consistent-hash exchange with 64 quorum queues bound once, in order, weight "1"
    ring = Ring(amqp_url, prefix, RING_QUEUES)

    def route(keys: list[str]) -> dict[str, str]:
        return ring.route(amqp_url, keys)

    keys = [f"item-{i}" for i in range(2000)]
    before = route(keys)
    assert len(before) == len(keys)
    # When the broker app restarts (up to five times: whether the quorum queues' bindings come back
    # in another order varies; seen here: 0%, 71%, 16% of keys moved on three restarts in a row)
    moved_fractions = []
    for _ in range(5):
        restart_broker_app()
        after = route(keys)
        moved_fractions.append(sum(before[k] != after[k] for k in keys) / len(keys))
        if moved_fractions[-1] > 0:
            break
        before = after
    print(f"[ring] fraction of keys routed elsewhere after each restart: {moved_fractions}")
    # Then keys really land in other queues afterwards
    assert max(moved_fractions) > 0
