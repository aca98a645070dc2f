"""``ctlpool parked`` against the real broker: messages parked by a real pool, listed, replayed, purged.

The CLI runs as a subprocess, as an operator would run it. Replay is checked end to end: the
replayed event is reconciled by a pool running the "fixed" controller (``Healed`` below, loaded
by the pool's workers from this module).
"""

from __future__ import annotations

import asyncio
import json
import os
import pty
import subprocess
import time
from pathlib import Path
from typing import Any

import pika
import pytest

from pool.settings import BrokerSettings, TopologySettings
from tests.ctl_fixtures import Recorder, read_records
from tests.helpers import Pool, ctlpool_cli, publish_many, queue_depth, wait_until

PARTITIONS = 4


class Healed(Recorder):
    """The controller after the bug was fixed: every event it is given now reconciles."""

    async def reconcile(self, key: str, event: Any, ctx: Any) -> None:
        ev = event if isinstance(event, dict) else {}
        return self._finish(key, {"n": ev.get("n")}, ctx, time.monotonic_ns())


def parked_cli(url: str, prefix: str, *args: str, stdin: Any = subprocess.DEVNULL) -> subprocess.CompletedProcess[str]:
    return ctlpool_cli(url, "parked", *args, "--prefix", prefix, stdin=stdin)


def listed(url: str, prefix: str, *args: str) -> list[dict[str, Any]]:
    r = parked_cli(url, prefix, "list", "rec", "--json", *args)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def pool(url: str, prefix: str, tmp_path: Path, rec_dir: Path, controllers: str, log: str, **env: str) -> Pool:
    return Pool(url, prefix, controllers, "--workers", "2", "--partitions", str(PARTITIONS),
                env={"CTLPOOL_TEST_RECORD_DIR": str(rec_dir), **env}, log_path=tmp_path / log)


def publish_raw(url: str, exchange: str, key: str, body: bytes, headers: dict[str, Any] | None = None) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        ch.basic_publish(exchange, key, body, pika.BasicProperties(delivery_mode=2, headers=headers), mandatory=True)
    finally:
        conn.close()


@pytest.fixture
def rec_dir(tmp_path: Path) -> Path:
    d = tmp_path / "rec"
    d.mkdir()
    return d


@pytest.mark.timeout(150)
def test_list_show_replay_purge_of_really_parked_events(amqp_url, prefix, tmp_path, rec_dir):
    parked_q = f"{prefix}.rec.parked"
    # Given a pool whose controller parks after one failed attempt
    buggy = pool(amqp_url, prefix, tmp_path, rec_dir, "tests.ctl_fixtures:Recorder", "buggy.log",
                 CTLPOOL_TEST_MAX_ATTEMPTS="1").start()
    try:
        buggy.wait_ready()
        # and two invalid items, one failing item and a garbage body get parked for real
        publish_many(amqp_url, prefix, "rec", [("perm-a", {"n": 1, "permanent": True})])
        publish_many(amqp_url, prefix, "rec", [("flaky", {"n": 1, "fail": 1})])
        publish_raw(amqp_url, f"{prefix}.rec", "junk", b"{nope")
        publish_many(amqp_url, prefix, "rec", [("perm-b", {"n": 1, "permanent": True})])
        wait_until(lambda: queue_depth(amqp_url, parked_q) == 4, 60, what="4 parked")
    finally:
        assert buggy.stop() == 0

    # When they are listed
    items = listed(amqp_url, prefix)
    # Then each shows its item key, reason, error, attempt, parked time and size; nothing was removed
    by_key = {i["key"]: i for i in items}
    assert set(by_key) == {"perm-a", "perm-b", "flaky", "junk"}
    assert by_key["perm-a"]["reason"] == by_key["perm-b"]["reason"] == "permanent"
    assert "item perm-a is invalid" in by_key["perm-a"]["error"]
    assert by_key["flaky"]["reason"] == "max-attempts" and "transient failure 1" in by_key["flaky"]["error"]
    assert by_key["junk"]["reason"] == "undecodable" and by_key["junk"]["size"] == len(b"{nope")
    assert all(i["parked_at"] and i["parked_at"].endswith("Z") for i in items)
    assert all(i["parked_from"].startswith(f"{prefix}.rec.p") for i in items)
    assert queue_depth(amqp_url, parked_q) == 4
    order = [i["key"] for i in items]
    assert [i["key"] for i in listed(amqp_url, prefix)] == order, "reading keeps the queue order"
    # and filters select by reason, key and count
    assert sorted(i["key"] for i in listed(amqp_url, prefix, "--reason", "permanent")) == ["perm-a", "perm-b"]
    assert [i["key"] for i in listed(amqp_url, prefix, "--key", "junk")] == ["junk"]
    assert [i["key"] for i in listed(amqp_url, prefix, "--limit", "2")] == order[:2]
    # and the text listing and `show` say the same for a human
    text = parked_cli(amqp_url, prefix, "list", "rec").stdout
    assert f"{parked_q}: 4 parked, 4 selected" in text and "max-attempts" in text
    show = parked_cli(amqp_url, prefix, "show", "rec", "--key", "junk").stdout
    assert "reason=undecodable" in show and "body: {nope" in show and "x-ctlpool-error" in show

    # When the fixed controller runs and the failed event is replayed by key
    healed = pool(amqp_url, prefix, tmp_path, rec_dir, "tests.broker.test_parked:Healed", "healed.log").start()
    try:
        healed.wait_ready()
        r = parked_cli(amqp_url, prefix, "replay", "rec", "--key", "flaky")
        assert r.returncode == 0, r.stderr
        assert f"replayed 1 of 1 selected parked event(s) through {prefix}.rec" in r.stdout
        # Then it is reconciled again, with a fresh attempt count, and its parked copy is gone
        wait_until(lambda: any(x["k"] == "flaky" and x["r"] == "ok" for x in read_records(str(rec_dir))), 30,
                   what="replayed event reconciled")
    finally:
        assert healed.stop() == 0
    flaky = [x for x in read_records(str(rec_dir)) if x["k"] == "flaky"]
    assert [(x["r"], x["a"]) for x in flaky] == [("error", 0), ("ok", 0)]
    assert [i["key"] for i in listed(amqp_url, prefix)] == [k for k in order if k != "flaky"]

    # When a purge is asked for without a terminal and without --yes
    r = parked_cli(amqp_url, prefix, "purge", "rec", "--reason", "permanent")
    # Then it refuses in one line, exit 2, removing nothing
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--yes" in r.stderr
    assert queue_depth(amqp_url, parked_q) == 3
    # When one permanent event is purged by key, with --yes
    r = parked_cli(amqp_url, prefix, "purge", "rec", "--reason", "permanent", "--key", "perm-a", "--yes")
    assert r.returncode == 0, r.stderr
    assert f"purged 1 parked event(s) from {parked_q}" in r.stdout
    # Then exactly that one is gone; the others stay, in their order
    assert [i["key"] for i in listed(amqp_url, prefix)] == [k for k in order if k not in ("flaky", "perm-a")]
    # and a purge that matches nothing removes nothing
    r = parked_cli(amqp_url, prefix, "purge", "rec", "--reason", "too-many-deliveries", "--yes")
    assert r.returncode == 0 and "purged 0" in r.stdout
    assert queue_depth(amqp_url, parked_q) == 2


def ensure_topology(url: str, prefix: str) -> None:
    from pool import topology

    asyncio.run(topology.ensure(BrokerSettings(amqp_url=url, prefix=prefix), TopologySettings(partitions=PARTITIONS),
                                ["rec"]))


def park_by_hand(url: str, prefix: str, key: str | None, reason: str, **extra: Any) -> None:
    """A parked message as the worker writes it (or, without key, as an older worker did)."""
    headers: dict[str, Any] = {"x-ctlpool-reason": reason, "x-ctlpool-error": f"{reason} of {key}",
                               "x-ctlpool-parked-ms": int(time.time() * 1000), **extra}
    if key is not None:
        headers["x-ctlpool-key"] = key
    publish_raw(url, "", f"{prefix}.rec.parked", b'{"n": 1}', headers)


@pytest.mark.timeout(60)
def test_purge_on_a_terminal_asks_first(amqp_url, prefix):
    # Given three parked events
    ensure_topology(amqp_url, prefix)
    for key in ("a", "b", "c"):
        park_by_hand(amqp_url, prefix, key, "permanent")

    def purge_answering(answer: bytes) -> subprocess.CompletedProcess[str]:
        primary, replica = pty.openpty()
        try:
            os.write(primary, answer)
            return parked_cli(amqp_url, prefix, "purge", "rec", "--key", "b", stdin=replica)
        finally:
            os.close(primary)
            os.close(replica)

    # When purge runs on a terminal and the operator answers no
    r = purge_answering(b"n\n")
    # Then it asked, naming what it would remove, and removed nothing
    assert r.returncode == 0, r.stderr
    assert "purge 1 parked event(s) of rec (key=b)" in r.stdout and "nothing removed" in r.stdout
    assert queue_depth(amqp_url, f"{prefix}.rec.parked") == 3
    # When the answer is yes
    r = purge_answering(b"y\n")
    # Then only the selected event is gone
    assert "purged 1 parked event(s)" in r.stdout
    assert [i["key"] for i in listed(amqp_url, prefix)] == ["a", "c"]


@pytest.mark.timeout(60)
def test_keys_from_x_death_and_events_without_a_key(amqp_url, prefix):
    # Given one event dead-lettered by the broker (its key only in x-death) and one without any key
    ensure_topology(amqp_url, prefix)
    death = {"x-death": [{"count": 20, "reason": "delivery_limit", "queue": f"{prefix}.rec.p001",
                          "exchange": f"{prefix}.rec", "routing-keys": ["from-death"]}]}
    publish_raw(amqp_url, "", f"{prefix}.rec.parked", b"{}", death)
    park_by_hand(amqp_url, prefix, None, "permanent")
    # When listed
    items = listed(amqp_url, prefix)
    # Then the broker's one shows its key and reason from x-death; the other has no key
    assert [(i["key"], i["reason"]) for i in items] == [("from-death", "broker:delivery_limit"), (None, "permanent")]
    assert items[0]["parked_from"] == f"{prefix}.rec.p001"
    # When both are replayed
    r = parked_cli(amqp_url, prefix, "replay", "rec")
    # Then the one with a key went back to the exchange; the other stays parked, and the exit code says so
    assert r.returncode == 1
    assert "replayed 1 of 2" in r.stdout and "item key unknown" in r.stderr
    assert [i["key"] for i in listed(amqp_url, prefix)] == [None]
    routed = sum(queue_depth(amqp_url, f"{prefix}.rec.p{i:03d}") for i in range(PARTITIONS))
    assert routed == 1


@pytest.mark.timeout(30)
def test_unknown_controller_is_one_line(amqp_url, prefix):
    # Given no topology under this prefix
    # When parked events of a controller that does not exist are listed
    r = parked_cli(amqp_url, prefix, "list", "nope")
    # Then one line says what is missing, exit 2
    assert r.returncode == 2
    assert r.stderr.strip() == (f"ctlpool: error: no parking queue {prefix}.nope.parked: is 'nope' a controller "
                                f"(and --prefix {prefix} right)?")
