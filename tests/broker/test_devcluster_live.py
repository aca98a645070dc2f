"""``pool.devcluster`` against real RabbitMQ nodes: three of them, clustered, with the plugin, beside
the default broker, and the fault helpers the chaos tests use.

The cluster is brought up (or reused, when it runs already) and left running for the next user:
starting it from nothing takes ~20 s on a 2-core box, finding it up ~3 s. Needs root, as the tool
does; anything missing fails the test with the line that says what to run (never a skip).
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid

import pika
import pytest

from pool.devcluster import NODES, PLUGIN, ClusterError, LocalCluster

pytestmark = [pytest.mark.broker, pytest.mark.timeout(300)]
NAMES = {n.name for n in NODES}


@pytest.fixture(scope="module")
def cluster() -> LocalCluster:
    c = LocalCluster()
    try:
        c.up()
    except ClusterError as exc:
        pytest.fail(f"dev cluster not usable: {exc}", pytrace=False)
    return c


def rabbitmqctl(*args: str) -> str:
    r = subprocess.run(["/usr/sbin/rabbitmqctl", *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_three_nodes_run_in_one_cluster(cluster: LocalCluster) -> None:
    # When c1 is asked for its cluster status, as an operator would ask
    status = json.loads(rabbitmqctl("-n", NODES[0].name, "cluster_status", "--formatter", "json"))
    # Then all three nodes are members and running
    assert set(status["disk_nodes"]) == NAMES
    assert set(status["running_nodes"]) == NAMES


def test_the_plugin_is_enabled_and_running_on_every_node(cluster: LocalCluster) -> None:
    for node in NODES:
        # When rabbitmq-plugins lists the node's plugins (reading the cluster's enabled-plugins file)
        r = subprocess.run(["/usr/sbin/rabbitmq-plugins", "-n", node.name, "list", "--formatter", "json"],
                           capture_output=True, text=True, timeout=60,
                           env={"PATH": "/usr/bin:/bin", "RABBITMQ_ENABLED_PLUGINS_FILE": str(
                               cluster.base / "enabled_plugins")})
        assert r.returncode == 0, r.stderr
        plugin = next(p for p in json.loads(r.stdout)["plugins"] if p["name"] == PLUGIN)
        # Then it is explicitly enabled and runs there
        assert plugin["enabled"] == "enabled" and plugin["running"] is True, (node.name, plugin)


def test_each_port_takes_an_amqp_connection_to_its_own_node(cluster: LocalCluster) -> None:
    prefix = f"t{uuid.uuid4().hex[:10]}"
    try:
        for node in NODES:
            # Given a connection to the node's AMQP port
            conn = pika.BlockingConnection(pika.URLParameters(node.url))
            try:
                ch = conn.channel()
                # When it declares a quorum queue and a consistent-hash exchange
                ch.queue_declare(f"{prefix}.q{node.number}", durable=True, arguments={"x-queue-type": "quorum"})
                ch.exchange_declare(f"{prefix}.x{node.number}", "x-consistent-hash", auto_delete=True)
                ch.exchange_delete(f"{prefix}.x{node.number}")
            finally:
                conn.close()
        # Then each queue's leader is the node the client was connected to (3.10's client-local placement)
        leaders = {q: n for q, n in cluster.leaders().items() if q.startswith(prefix)}
        assert leaders == {f"{prefix}.q{n.number}": n.name for n in NODES}
    finally:
        conn = pika.BlockingConnection(pika.URLParameters(NODES[0].url))
        for node in NODES:
            conn.channel().queue_delete(f"{prefix}.q{node.number}")
        conn.close()


def test_up_again_finds_it_up(cluster: LocalCluster) -> None:
    # When up runs on the running cluster
    t0 = time.monotonic()
    changed = cluster.up()
    # Then it has nothing to do, and says so quickly
    assert changed is False and time.monotonic() - t0 < 15


def test_a_killed_node_restarts_and_rejoins(cluster: LocalCluster) -> None:
    # Given node 3 killed with SIGKILL
    pid = cluster.kill(3)
    assert cluster.state(3) == "down" and cluster.os_pid(3) is None
    # Then c1 sees two nodes running
    assert cluster.members(1)[1] == NAMES - {NODES[2].name}
    # When it is restarted
    cluster.restart(3)
    # Then it runs as a new process, back in the cluster
    assert cluster.os_pid(3) not in (None, pid)
    assert cluster.in_cluster(3) and cluster.members(1)[1] == NAMES


def test_a_stopped_app_starts_again(cluster: LocalCluster) -> None:
    cluster.stop_app(2)
    assert cluster.state(2) == "stopped"
    cluster.start_app(2)
    assert cluster.is_running(2)


def test_the_default_broker_is_left_alone(cluster: LocalCluster) -> None:
    # The cluster shares epmd and the cookie with rabbit@localhost, nothing else: it still answers
    assert "rabbit@localhost" in rabbitmqctl("-n", "rabbit@localhost", "status")
