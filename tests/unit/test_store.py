"""The example store on both backends: CRUD, and version checks that refuse lost updates.

SQLite runs in tmp_path. PostgreSQL runs on the local server (CTLPOOL_TEST_PG_URL, default
postgres@127.0.0.1:5432) in a fresh ``ctlpool_test_<uuid>`` database per test, dropped after;
an unreachable server fails the test when CI is set and skips it otherwise.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from controllers.store import (
    AVAILABLE,
    READY,
    Conflict,
    Deployment,
    Instance,
    Store,
    open_store,
)

PG_ADMIN_URL = os.environ.get("CTLPOOL_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
START_PG = "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"


def _unavailable(message: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A URL to a fresh, uniquely named PostgreSQL database, dropped after the test."""
    try:
        import psycopg
    except ImportError:
        _unavailable("psycopg is not installed: pip install -e '.[test]'")
    try:
        admin = psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        _unavailable(f"PostgreSQL not reachable at {PG_ADMIN_URL}: {exc}; start it with: {START_PG}")
    name = f"ctlpool_test_{uuid.uuid4().hex[:12]}"
    admin.execute(f"CREATE DATABASE {name}")
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    finally:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite://{tmp_path / 'store.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    s = Store(store_url)
    yield s
    s.close()


def test_deployment_crud(store):
    # Given a new deployment
    created = store.insert(Deployment("web", "nginx:1", 3))
    # When it is read, updated, read again
    assert store.get(Deployment, "web") == created
    updated = store.update(created, status=AVAILABLE, ready=3)
    # Then each write bumped the version and is what a fresh read returns
    assert (created.version, updated.version) == (1, 2)
    assert store.get(Deployment, "web") == updated
    assert [d.name for d in store.deployments()] == ["web"]
    # And deleting it at its current version removes it
    store.delete(updated)
    assert store.get(Deployment, "web") is None
    assert store.deployments() == []


def test_instance_crud_and_listing(store):
    # Given instances of two deployments, inserted out of order
    for key, dep, ordinal in [("a-1", "a", 1), ("b-0", "b", 0), ("a-0", "a", 0)]:
        store.insert(Instance(key, dep, ordinal, "img:1"))
    # When one becomes ready
    a0 = store.update(store.get(Instance, "a-0"), state=READY, running="img:1")
    # Then listings are by deployment and ordinal, and the nullable column round-trips
    assert [i.key for i in store.instances("a")] == ["a-0", "a-1"]
    assert [i.key for i in store.instances()] == ["a-0", "a-1", "b-0"]
    assert store.get(Instance, "a-0") == a0
    assert store.get(Instance, "a-1").running is None
    # And purge removes a deployment with all of its instances
    store.insert(Deployment("a", "img:1", 2))
    store.purge("a")
    assert store.get(Deployment, "a") is None
    assert [i.key for i in store.instances()] == ["b-0"]


def test_insert_of_an_existing_key_conflicts(store):
    store.insert(Deployment("web", "nginx:1", 3))
    with pytest.raises(Conflict):
        store.insert(Deployment("web", "nginx:2", 1))
    assert store.get(Deployment, "web").image == "nginx:1"


def test_stale_update_conflicts_and_does_not_overwrite(store):
    # Given two writers that read the same version of a deployment
    store.insert(Deployment("web", "nginx:1", 3))
    first = store.get(Deployment, "web")
    second = store.get(Deployment, "web")
    # When the first one writes a new spec
    store.update(first, image="nginx:2", generation=2)
    # Then the second one's write, based on the old version, is refused
    with pytest.raises(Conflict):
        store.update(second, image="nginx:1-stale", replicas=9)
    # And the first one's write is what remains (no lost update)
    now = store.get(Deployment, "web")
    assert (now.image, now.replicas, now.generation, now.version) == ("nginx:2", 3, 2, 2)


def test_stale_delete_conflicts_and_update_of_a_deleted_row_conflicts(store):
    inst = store.insert(Instance("web-0", "web", 0, "nginx:1"))
    newer = store.update(inst, state=READY, running="nginx:1")
    with pytest.raises(Conflict):
        store.delete(inst)
    assert store.get(Instance, "web-0") == newer
    store.delete(newer)
    with pytest.raises(Conflict):
        store.update(newer, attempts=1)
    assert store.get(Instance, "web-0") is None


def _increment(url: str, times: int) -> None:
    """Add 1 to the counter ``times`` times, re-reading on every Conflict (what a retried reconcile does)."""
    s = Store(url, pool_size=2)
    for _ in range(times):
        while True:
            d = s.get(Deployment, "counter")
            try:
                s.update(d, replicas=d.replicas + 1)
                break
            except Conflict:
                continue
    s.close()


def test_concurrent_writers_from_processes_and_threads_lose_no_update(store, store_url):
    # Given a counter row
    store.insert(Deployment("counter", "-", 0))
    # When 2 processes with 2 threads each increment it 15 times each, with read-modify-write
    def proc_main() -> None:
        threads = [threading.Thread(target=_increment, args=(store_url, 15)) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=proc_main) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    # Then every increment counted once
    assert [p.exitcode for p in procs] == [0, 0]
    assert store.get(Deployment, "counter").replicas == 60


def test_sqlite_store_uses_wal(tmp_path):
    s = Store(f"sqlite://{tmp_path / 'w.db'}")
    with s._conn() as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    s.close()


@pytest.mark.parametrize("url", ["mysql://x/y", "sqlite://", "/tmp/x.db"])
def test_unknown_store_url_is_refused(url):
    with pytest.raises(ValueError, match="store URL"):
        Store(url)


def test_open_store_reads_the_environment_and_is_shared_per_process(tmp_path, monkeypatch):
    url = f"sqlite://{tmp_path / 'env.db'}"
    monkeypatch.setenv("CTLPOOL_STORE", url)
    s = open_store()
    assert s.url == url
    assert open_store() is s
