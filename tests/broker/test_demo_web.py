"""``ctlpool demo`` end to end: a real pool subprocess on a topology of its own, a real store (SQLite
and PostgreSQL), injected provider failures. (The controllers themselves are tested with no
broker on ``pool.testing``: ``tests/unit/test_demo_controllers.py``.)"""

from __future__ import annotations

import argparse
import re
import tempfile
from pathlib import Path
from typing import Any

import pytest

from controllers.demo import pool_args, run_demo
from controllers.store import READY, Store
from pool.settings import BrokerSettings, PoolSettings, TopologySettings
from tests.helpers import queue_depth
from tests.unit.test_store import postgres_url  # noqa: F401  (fixture)


def test_the_pool_flags_honour_settings_and_hide_the_password():
    settings = PoolSettings(workers=2, broker=BrokerSettings(amqp_url="amqp://u:secret@h:5672/%2F", prefix="p1"),
                            topology=TopologySettings(partitions=8, queue_type="classic", tiers_s=(1, 4)))
    cmd = pool_args(settings)
    flags = dict(zip(cmd[0::2], cmd[1::2]))
    assert flags["--partitions"] == "8" and flags["--workers"] == "2" and flags["--queue-type"] == "classic"
    assert flags["--tiers-s"] == "1,4" and flags["--prefix"] == "p1" and flags["--log-format"] == "text"
    assert not any("secret" in part for part in cmd)
    assert "None" not in cmd


# ---------------------------------------------------------------- the demo on a real pool

SUMMARY = re.compile(r"converged (\d+) deployments \((\d+) instances\) in [\d.]+ s; (\d+) provider failures")


def demo_args(store: str, **overrides: Any) -> argparse.Namespace:
    values = {"deployments": 10, "replicas": 3, "fail_rate": 0.3, "store": store, "timeout_s": 90.0, **overrides}
    return argparse.Namespace(**values)


@pytest.fixture(autouse=True)
def demo_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The demo keeps its temp dir (pool log) when it fails: keep that inside the test's tmp_path."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


def demo_settings(amqp_url: str, prefix: str) -> PoolSettings:
    return PoolSettings(workers=2, broker=BrokerSettings(amqp_url=amqp_url, prefix=prefix),
                        topology=TopologySettings(partitions=8))


@pytest.mark.broker
@pytest.mark.timeout(150)
@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_demo_converges_despite_provider_failures(amqp_url, prefix, tmp_path, capsys, request, backend):
    # Given a store and a pool topology of this test's own
    url = f"sqlite://{tmp_path / 'demo.db'}" if backend == "sqlite" else request.getfixturevalue("postgres_url")
    # When the demo runs 10 deployments x 3 replicas with 30% of provider calls failing, then updates them
    code = run_demo(demo_args(url), demo_settings(amqp_url, prefix))
    out, err = capsys.readouterr()
    # Then it converged twice (create, update), with failures retried, and the pool drained cleanly
    assert code == 0, err[-3000:]
    summaries = [tuple(int(g) for g in m.groups()) for m in SUMMARY.finditer(out)]
    assert [(n, i) for n, i, _ in summaries] == [(10, 30), (10, 25)], out
    assert sum(f for _, _, f in summaries) > 0, "with a 30% failure rate some provisions must have failed"
    assert "pool stopped (exit 0)" in err
    # And the store holds exactly the desired instances, all ready at their deployment's image
    store = Store(url)
    try:
        deployments = {d.name: d for d in store.deployments()}
        instances = store.instances()
        assert len(deployments) == 10 and all(d.converged for d in deployments.values())
        assert len(instances) == sum(d.replicas for d in deployments.values()) == 25
        assert all(i.state == READY and i.running == deployments[i.deployment].image for i in instances)
    finally:
        store.close()
    # And nothing was parked
    for controller in ("deployments", "instances"):
        assert queue_depth(amqp_url, f"{prefix}.{controller}.parked") == 0


@pytest.mark.broker
@pytest.mark.timeout(120)
def test_demo_times_out_naming_what_did_not_converge(amqp_url, prefix, tmp_path, capsys):
    # Given a provider that fails 99% of the time
    args = demo_args(f"sqlite://{tmp_path / 'demo.db'}", deployments=2, replicas=2, fail_rate=0.99, timeout_s=15.0)
    # When the demo runs out of time
    code = run_demo(args, demo_settings(amqp_url, prefix))
    out, err = capsys.readouterr()
    # Then it fails, names the deployments that did not converge, and still stops the pool cleanly
    assert code == 1
    assert re.search(r"timed out: 2 deployments not converged: demo-00 \(\d/2 ready", err), err[-3000:]
    assert "pool stopped (exit 0)" in err
    assert list(tmp_path.glob("ctlpool-demo-*/pool.log")), "the pool log is kept when the demo fails"
