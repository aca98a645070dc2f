"""The example controller web (Deployments <-> Instances) and ``ctlpool demo``.

First the reconciles themselves, called directly on a SQLite store with a recording
context (no broker); then ``run_demo`` end to end: a real pool subprocess on a topology
of its own, a real store (SQLite and PostgreSQL), injected provider failures.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import re
import tempfile
from pathlib import Path
from typing import Any

import pytest

from controllers import deployments as web
from controllers.demo import pool_args, run_demo
from controllers.deployments import DeploymentEvent, Deployments, InstanceEvent, Instances, ProviderError
from controllers.store import AVAILABLE, PENDING, READY, TERMINATING, Conflict, Deployment, Instance, Store
from pool import Result
from pool.settings import BrokerSettings, PoolSettings, TopologySettings
from tests.helpers import queue_depth
from tests.unit.test_store import postgres_url  # noqa: F401  (fixture)


class RecordingContext:
    """What a reconcile sees of the pool: ``publish`` records instead of sending."""

    attempt = 0

    def __init__(self) -> None:
        self.published: list[tuple[str, str, Any]] = []

    def publish(self, controller: str, key: str, payload: Any) -> concurrent.futures.Future[None]:
        self.published.append((controller, key, payload))
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        done.set_result(None)
        return done


@pytest.fixture
def web_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Store:
    monkeypatch.setenv("CTLPOOL_STORE", f"sqlite://{tmp_path / 'web.db'}")
    monkeypatch.setenv(web.ENV_FAIL_RATE, "0")
    monkeypatch.setenv(web.ENV_PROVIDER_MS, "0")
    from controllers.store import open_store

    return open_store()


def controllers() -> tuple[Deployments, Instances]:
    d, i = Deployments(), Instances()
    d.setup()
    i.setup()
    return d, i


def provision_all(instances: Instances, ctx: RecordingContext, keys: list[str]) -> None:
    for key in keys:
        assert instances.reconcile(key, InstanceEvent(deployment=key.rsplit("-", 1)[0]), ctx) is None


def test_a_deployment_converges_through_its_instances(web_store):
    deployments, instances = controllers()
    # Given a desired deployment of 3 replicas
    web_store.insert(Deployment("web", "img:1", 3))
    # When it is reconciled
    ctx = RecordingContext()
    result = deployments.reconcile("web", DeploymentEvent(), ctx)
    # Then its 3 instances exist, pending, each nudged, and it looks again later
    assert result == Result(requeue_after=web.REQUEUE_S)
    assert [(i.key, i.state, i.image) for i in web_store.instances("web")] == \
        [(f"web-{n}", PENDING, "img:1") for n in range(3)]
    assert [(c, k) for c, k, _ in ctx.published] == [("instances", f"web-{n}") for n in range(3)]
    # When the instances are provisioned, each telling its deployment
    back = RecordingContext()
    provision_all(instances, back, [k for _, k, _ in ctx.published])
    assert [(c, k) for c, k, _ in back.published] == [("deployments", "web")] * 3
    # Then the next reconcile finds it converged and writes that down
    assert deployments.reconcile("web", DeploymentEvent(), RecordingContext()) is None
    d = web_store.get(Deployment, "web")
    assert (d.ready, d.instances, d.status, d.converged) == (3, 3, AVAILABLE, True)


def test_image_change_and_scale_down(web_store):
    deployments, instances = controllers()
    # Given a converged deployment of 3
    web_store.insert(Deployment("web", "img:1", 3))
    ctx = RecordingContext()
    deployments.reconcile("web", DeploymentEvent(), ctx)
    provision_all(instances, RecordingContext(), [k for _, k, _ in ctx.published])
    deployments.reconcile("web", DeploymentEvent(), RecordingContext())
    # When its spec changes to 1 replica of img:2
    d = web_store.get(Deployment, "web")
    web_store.update(d, image="img:2", replicas=1, generation=d.generation + 1)
    ctx = RecordingContext()
    assert deployments.reconcile("web", DeploymentEvent(), ctx) == Result(requeue_after=web.REQUEUE_S)
    # Then instance 0 is asked for img:2 and the others terminate; status is not converged
    assert [(i.key, i.state, i.image) for i in web_store.instances("web")] == \
        [("web-0", PENDING, "img:2"), ("web-1", TERMINATING, "img:1"), ("web-2", TERMINATING, "img:1")]
    assert not web_store.get(Deployment, "web").converged
    # When the instances act on it
    provision_all(instances, RecordingContext(), [k for _, k, _ in ctx.published])
    # Then one instance is left, at the new image, and the deployment converges
    assert [(i.key, i.state, i.running) for i in web_store.instances("web")] == [("web-0", READY, "img:2")]
    assert deployments.reconcile("web", DeploymentEvent(), RecordingContext()) is None
    assert web_store.get(Deployment, "web").converged


def test_a_deleted_deployment_terminates_its_instances(web_store):
    deployments, instances = controllers()
    d = web_store.insert(Deployment("web", "img:1", 2))
    deployments.reconcile("web", DeploymentEvent(), RecordingContext())
    web_store.delete(web_store.get(Deployment, "web"))
    ctx = RecordingContext()
    assert deployments.reconcile(d.name, DeploymentEvent(), ctx) is None
    assert {i.state for i in web_store.instances("web")} == {TERMINATING}
    provision_all(instances, RecordingContext(), [k for _, k, _ in ctx.published])
    assert web_store.instances("web") == []


def test_provider_failure_raises_counts_and_tells_nobody(web_store):
    deployments, instances = controllers()
    web_store.insert(Deployment("web", "img:1", 1))
    deployments.reconcile("web", DeploymentEvent(), RecordingContext())
    # Given a provider that always fails
    instances.provider = web.Provider(latency_s=0, fail_rate=1.0, sleep=lambda s: None)
    ctx = RecordingContext()
    # When the instance is reconciled, Then the error propagates (the pool retries it)
    with pytest.raises(ProviderError):
        instances.reconcile("web-0", InstanceEvent(deployment="web"), ctx)
    # And the failure is counted on the row, nothing is published, nothing is marked ready
    inst = web_store.get(Instance, "web-0")
    assert (inst.state, inst.attempts, ctx.published) == (PENDING, 1, [])


def test_a_stale_provision_cannot_overwrite_a_newer_spec(web_store):
    deployments, instances = controllers()
    web_store.insert(Deployment("web", "img:1", 1))
    deployments.reconcile("web", DeploymentEvent(), RecordingContext())

    # Given the deployment moves the instance to img:2 while the provider is provisioning img:1
    def meanwhile(_: float) -> None:
        web_store.update(web_store.get(Instance, "web-0"), image="img:2")

    instances.provider = web.Provider(latency_s=0, fail_rate=0, sleep=meanwhile)
    # When the provision finishes, Then its write is refused
    with pytest.raises(Conflict):
        instances.reconcile("web-0", InstanceEvent(deployment="web"), RecordingContext())
    # And the instance still waits for img:2 instead of claiming img:1 is what it should run
    inst = web_store.get(Instance, "web-0")
    assert (inst.state, inst.image, inst.running) == (PENDING, "img:2", None)


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
