"""Topology against the real broker: a controller's queue type is fixed once it exists, and its
partition count is its live layout's.

``ctlpool topology`` and ``ctlpool run`` run as subprocesses, as an operator would run them:
another partition count is followed (the flag is what a new controller gets; a resize changes a
live one), another queue type is refused (exit 78) with a line that names what differs, and the
existing topology is left as it was. Fresh partitions start with their ring-drift "clean"
marker; queues left behind by a deleted exchange do not get one.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.helpers import Pool, ctlpool_cli, delete, exists, publish_many, queue_depth

CONTROLLER = "tests.ctl_fixtures:Recorder"


def ctl(url: str, prefix: str, *args: str) -> subprocess.CompletedProcess[str]:
    return ctlpool_cli(url, *args, "--prefix", prefix)


def test_a_topology_that_differs_from_the_flags(amqp_url, prefix, tmp_path: Path):
    # Given controller "rec" created with 4 quorum partitions, holding one event
    made = ctl(amqp_url, prefix, "topology", "rec", "--partitions", "4")
    assert made.returncode == 0, made.stderr
    publish_many(amqp_url, prefix, "rec", [("k1", {"n": 1})])
    before = sum(queue_depth(amqp_url, f"{prefix}.rec.p{i:03d}") for i in range(4))
    assert before == 1

    # When it is declared again with 8 partitions
    more = ctl(amqp_url, prefix, "topology", "rec", "--partitions", "8")
    # Then its live count (4) is kept and shown: the flag is what a new controller gets
    assert more.returncode == 0, more.stderr
    assert "4 partitions, layout version 1" in more.stdout and not exists(amqp_url, "queue", f"{prefix}.rec.p004")

    # When it is declared as classic queues
    classic = ctl(amqp_url, prefix, "topology", "rec", "--partitions", "4", "--queue-type", "classic")
    # Then the line says the broker has quorum queues
    assert classic.returncode == 78
    assert "exists on the broker with quorum queues" in classic.stderr and "--queue-type classic" in classic.stderr

    # When the pool itself starts with 2 partitions and the classic flag
    log = tmp_path / "pool.log"
    pool = Pool(amqp_url, prefix, CONTROLLER, "--partitions", "2", "--queue-type", "classic", "--workers", "1",
                log_path=log).start()
    code = pool.proc.wait(60)
    # Then it refuses to start, and nothing on the broker changed: no queue added, the event still there
    assert code == 78, log.read_text()[-2000:]
    assert "refusing to start" in log.read_text()
    assert not exists(amqp_url, "queue", f"{prefix}.rec.p004")
    assert sum(queue_depth(amqp_url, f"{prefix}.rec.p{i:03d}") for i in range(4)) == 1

    # And the original settings are still accepted
    again = ctl(amqp_url, prefix, "topology", "rec", "--partitions", "4")
    assert again.returncode == 0, again.stderr


def test_classic_topology_refuses_quorum(amqp_url, prefix):
    # Given controller "rec" created with classic partitions
    assert ctl(amqp_url, prefix, "topology", "rec", "--partitions", "4", "--queue-type", "classic").returncode == 0
    # When it is declared with the default queue type (quorum)
    r = ctl(amqp_url, prefix, "topology", "rec", "--partitions", "4")
    # Then the line says the broker has classic queues and which flag to use
    assert r.returncode == 78
    assert "exists on the broker with classic queues" in r.stderr and "use --queue-type classic" in r.stderr


def test_fresh_partitions_are_marked_clean_and_leftover_queues_are_not(amqp_url, prefix):
    # Given a fresh controller with 4 partitions
    assert ctl(amqp_url, prefix, "topology", "rec", "--partitions", "4").returncode == 0
    # Then every partition has its clean marker (nothing in it was routed by an earlier ring)
    markers = [f"{prefix}.rec.p{i:03d}.clean" for i in range(4)]
    assert all(exists(amqp_url, "exchange", m) for m in markers)

    # When the exchange and the markers are deleted but the queues are left behind
    delete(amqp_url, [], [f"{prefix}.rec", *markers])
    # And the controller is declared again
    assert ctl(amqp_url, prefix, "topology", "rec", "--partitions", "4").returncode == 0
    # Then the exchange is back, but the leftover partitions are not called clean: they may hold
    # events routed by the old exchange's ring, which their first owner must re-route
    assert exists(amqp_url, "exchange", f"{prefix}.rec")
    assert not any(exists(amqp_url, "exchange", m) for m in markers)
