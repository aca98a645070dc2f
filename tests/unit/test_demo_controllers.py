"""The example controller web (Deployments <-> Instances) on ``pool.testing``: both controllers under
test, talking to each other through the in-memory broker, on a real SQLite store, no RabbitMQ."""

from __future__ import annotations

from pathlib import Path

import pytest

from controllers import deployments as web
from controllers.deployments import Deployments, Instances
from controllers.store import AVAILABLE, READY, Deployment, Instance, Store


@pytest.fixture
def web_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Store:
    monkeypatch.setenv("CTLPOOL_STORE", f"sqlite://{tmp_path / 'web.db'}")
    monkeypatch.setenv(web.ENV_FAIL_RATE, "0")
    monkeypatch.setenv(web.ENV_PROVIDER_MS, "0")
    from controllers.store import open_store

    return open_store()


def converge(ctlpool, store: Store, name: str = "web", image: str = "img:1", replicas: int = 3):
    store.insert(Deployment(name, image, replicas))
    h = ctlpool(Deployments(), Instances())
    h.publish("deployments", name)
    h.run_until_idle()
    return h


def test_a_deployment_converges_through_its_instances(ctlpool, web_store):
    # Given a desired deployment of 3 replicas, When it is announced and the web runs
    h = converge(ctlpool, web_store)
    # Then its 3 instances run the image, and the deployment says so
    assert [(i.key, i.state, i.running) for i in web_store.instances("web")] == \
        [(f"web-{n}", READY, "img:1") for n in range(3)]
    d = web_store.get(Deployment, "web")
    assert (d.ready, d.instances, d.status, d.converged) == (3, 3, AVAILABLE, True)
    # the deployment looked again until converged, each instance was provisioned once
    deps = h.reconciles_of("web", "deployments")
    assert deps[0].outcome == "requeue_after" and deps[-1].outcome == "converged"
    assert sorted(r.key for r in h.reconciles if r.controller == "instances" and r.outcome == "converged") == \
        ["web-0", "web-1", "web-2"]
    assert h.parked == [] and h.published == []  # nothing left the web


def test_image_change_and_scale_down(ctlpool, web_store):
    # Given a converged deployment of 3
    converge(ctlpool, web_store)
    # When its spec changes to 1 replica of img:2
    d = web_store.get(Deployment, "web")
    web_store.update(d, image="img:2", replicas=1, generation=d.generation + 1)
    h = ctlpool(Deployments(), Instances())
    h.publish("deployments", "web")
    h.run_until_idle()
    # Then one instance is left, at the new image, and the deployment converges
    assert [(i.key, i.state, i.running) for i in web_store.instances("web")] == [("web-0", READY, "img:2")]
    assert web_store.get(Deployment, "web").converged


def test_a_deleted_deployment_terminates_its_instances(ctlpool, web_store):
    converge(ctlpool, web_store, replicas=2)
    web_store.delete(web_store.get(Deployment, "web"))
    h = ctlpool(Deployments(), Instances())
    h.publish("deployments", "web")
    h.run_until_idle()
    assert web_store.instances("web") == []


def test_a_provider_that_always_fails_is_retried_then_parked_telling_nobody(ctlpool, web_store):
    # Given a provider that always fails
    web_store.insert(Deployment("web", "img:1", 1))
    deployments, instances = Deployments(), Instances()
    deployments.setup()
    instances.setup()
    instances.provider = web.Provider(latency_s=0, fail_rate=1.0, sleep=lambda s: None)
    h = ctlpool(deployments, instances, setup=False)
    h.publish("deployments", "web")
    h.run(120)
    # Then the instance is tried as often as the demo's policy says, with its backoff, then parked
    tries = [r for r in h.reconciles if r.key == "web-0"]
    assert len(tries) == web.DEMO_RETRY.max_attempts and all(r.outcome == "error" for r in tries)
    assert [(p.key, p.reason) for p in h.parked] == [("web-0", "max-attempts")]
    assert "provider timed out" in h.parked[0].error
    # and each failure was counted on the row; nothing was marked ready
    inst = web_store.get(Instance, "web-0")
    assert (inst.state != READY, inst.attempts) == (True, web.DEMO_RETRY.max_attempts)


def test_a_stale_provision_cannot_overwrite_a_newer_spec(ctlpool, web_store):
    # Given the deployment's image changes to img:2 while the provider provisions img:1
    web_store.insert(Deployment("web", "img:1", 1))
    deployments, instances = Deployments(), Instances()
    deployments.setup()
    instances.setup()
    calls = []

    def meanwhile(_: float) -> None:
        calls.append(1)
        if len(calls) == 1:
            web_store.update(web_store.get(Deployment, "web"), image="img:2", generation=2)
            web_store.update(web_store.get(Instance, "web-0"), image="img:2")
    instances.provider = web.Provider(latency_s=0, fail_rate=0, sleep=meanwhile)
    h = ctlpool(deployments, instances, setup=False)
    h.publish("deployments", "web")
    h.run_until_idle()
    # Then the stale write was refused (a Conflict, retried), and the instance runs img:2, never img:1
    first = next(r for r in h.reconciles if r.key == "web-0")
    assert first.outcome == "error" and type(first.error).__name__ == "Conflict"
    inst = web_store.get(Instance, "web-0")
    assert (inst.state, inst.running) == (READY, "img:2")
    assert web_store.get(Deployment, "web").converged
