"""Fault injection against a real pool, round 2: what a foreign publisher can do with AMQP itself —
``CC`` copies and the default exchange (a key's event in another key's partition), a header just
under ``frame_max``, a routing key that isn't UTF-8, properties a copy must keep or drop, a
per-message ``expiration`` — and the RabbitMQ permissions that are the one remedy for ``BCC``.

Each test counts every event (per key, the last event published must be the last reconciled),
records when every reconcile starts, and looks at what was parked and why.
"""

from __future__ import annotations

import asyncio
import subprocess
from typing import Any

import pika
import pytest

from pool import copies
from tests.broker.test_faults_worker import (PARTITIONS, foreign_publish, logged, make_pool, parked_by_key, rec_dir,  # noqa: F401
                                             session_losses, under_load)
from tests.ctl_fixtures import overlaps, read_records
from tests.helpers import ROOT, _connect, ctlpool_cli, get_all, publish_many, queue_depth, wait_until
from tests.load import assert_latest_reconciled

pytestmark = pytest.mark.broker

FRAME_MAX = 131_072  # RabbitMQ's default, negotiated by every client here


def blob_for(frame_bytes: int, key: str = "x-blob") -> dict[str, Any]:
    """Headers whose content header frame, as a publisher sends it, is ``frame_bytes`` long."""
    headers = {key: ""}
    base = copies.header_size(pika.BasicProperties(headers=headers, delivery_mode=2)) - copies.SEQ_SIZE
    headers[key] = "b" * (frame_bytes - base)
    return headers


@pytest.mark.timeout(150)
def test_cc_copies_and_the_default_exchange_never_reach_a_second_owner(amqp_url, prefix, tmp_path, rec_dir):
    # Given a pool of two workers under load, and a slow key (each reconcile 300 ms)
    with under_load(amqp_url, prefix, tmp_path, rec_dir, rate=200, sleep_ms=20) as (pool, load):
        parts = [f"{prefix}.rec.p{i:03d}" for i in range(PARTITIONS)]
        others = [f"other{i}" for i in range(16)]
        # When a publisher sends the slow key's events with CC naming other keys (copies in their
        # partitions), and through the default exchange with CC naming every partition queue
        sent = 0
        for n in range(1, 21):
            body = f'{{"n": {n}, "sleep_ms": 300}}'.encode()
            if n % 2:
                foreign_publish(amqp_url, f"{prefix}.rec", [("slow", body, {"CC": others})])
            else:
                foreign_publish(amqp_url, "", [("slow", body, {"CC": parts})])
            sent = n
        wait_until(lambda: any(r["k"] == "slow" and r["r"] == "ok" and r["n"] == sent
                               for r in read_records(str(rec_dir))), 60, what="the slow key's last event")
    # Then no two workers ever reconciled the slow key at once, its last event was reconciled, and
    # nothing was parked: every copy was sent through the ring instead
    records = read_records(str(rec_dir))
    assert overlaps(records) == [], overlaps(records)[:3]
    assert_latest_reconciled(records, {**load.per_key, "slow": sent})
    assert parked_by_key(amqp_url, prefix) == {}
    assert len({r["pid"] for r in records if r["k"] == "slow"}) == 1  # only the ring's owner saw it
    assert logged(pool, "not through the ring")


@pytest.mark.timeout(150)
def test_an_event_16_bytes_under_frame_max_is_retried_and_parked_without_a_reset(amqp_url, prefix, tmp_path, rec_dir):
    # Given a pool under load
    with under_load(amqp_url, prefix, tmp_path, rec_dir, rate=200, sleep_ms=20) as (pool, load):
        # When a foreign publisher sends a failing event whose header frame is 16 bytes under frame_max
        headers = blob_for(FRAME_MAX - 16)
        assert copies.header_size(pika.BasicProperties(headers=headers, delivery_mode=2)) - copies.SEQ_SIZE == FRAME_MAX - 16
        foreign_publish(amqp_url, f"{prefix}.rec", [("huge", b'{"n": 1, "fail": 99}', headers)])
        wait_until(lambda: queue_depth(amqp_url, f"{prefix}.rec.parked") >= 1, 60, what="parked")
    # Then its retries and its parked copy fit the frame (the big header dropped and named): no
    # connection was reset, it was tried as often as the policy says, and only it was parked
    parked = parked_by_key(amqp_url, prefix)
    assert list(parked) == ["huge"] and len(parked["huge"]) == 1
    assert parked["huge"][0]["x-ctlpool-reason"] == "max-attempts"
    assert parked["huge"][0]["x-ctlpool-dropped-headers"] == "x-blob"
    assert session_losses(pool) == []
    records = read_records(str(rec_dir))
    assert [r["a"] for r in records if r["k"] == "huge"] == [0, 1, 2, 3]
    assert_latest_reconciled(records, load.per_key)


@pytest.mark.timeout(120)
def test_copies_keep_the_publishers_properties_and_a_bad_key_is_parked(amqp_url, prefix, tmp_path, rec_dir):
    pool = make_pool(amqp_url, prefix, tmp_path, rec_dir).start()
    try:
        pool.wait_ready()
        # Given events with every property a publisher may set: one that fails until parked (it rides
        # the delay tiers, copy after copy), and one with a routing key that is not UTF-8
        conn = _connect(amqp_url)
        ch = conn.channel()
        ch.confirm_delivery()
        props = pika.BasicProperties(message_id="m-1", correlation_id="c-1", reply_to="replies", type="deploy",
                                     app_id="web", timestamp=1_733_650_000_000, priority=3, expiration="600000",
                                     delivery_mode=2, content_type="application/json", headers={"x-app": "a"})
        ch.basic_publish(f"{prefix}.rec", "props", b'{"n": 1, "fail": 99}', props, mandatory=True)
        ch.basic_publish(f"{prefix}.rec", b"caf\xe9", b'{"n": 1}', pika.BasicProperties(delivery_mode=2),
                         mandatory=True)
        conn.close()
        wait_until(lambda: queue_depth(amqp_url, f"{prefix}.rec.parked") >= 2, 60, what="both parked")
    finally:
        assert pool.stop() == 0
    got = {p.headers["x-ctlpool-reason"]: p for _m, p, _b in get_all(amqp_url, f"{prefix}.rec.parked")}
    # Then the parked copy, four copies on from what was published, carries every property, but the
    # two a copy can't carry, named
    p = got["max-attempts"]
    assert (p.message_id, p.correlation_id, p.reply_to, p.type, p.app_id, p.timestamp, p.priority) == (
        "m-1", "c-1", "replies", "deploy", "web", 1_733_650_000_000, 3)
    assert p.expiration is None and p.headers["x-ctlpool-dropped-properties"] == "expiration=600000"
    assert p.headers["x-app"] == "a"
    # and the key that is not UTF-8 was parked as such, never reconciled (no bytes in a reconcile)
    assert "not UTF-8" in got["bad-key"].headers["x-ctlpool-error"]
    assert {r["k"] for r in read_records(str(rec_dir))} == {"props"}


@pytest.mark.timeout(120)
def test_an_event_the_broker_expired_is_explained_and_replayed(amqp_url, prefix, tmp_path, rec_dir):
    # Given the controller's topology and no pool yet, and an event published with a 300 ms
    # per-message expiration that waits longer than that in its partition
    from pool import topology
    from pool.settings import BrokerSettings, TopologySettings

    asyncio.run(topology.ensure(BrokerSettings(amqp_url=amqp_url, prefix=prefix),
                                TopologySettings(partitions=PARTITIONS), ["rec"]))
    conn = _connect(amqp_url)
    ch = conn.channel()
    ch.confirm_delivery()
    ch.basic_publish(f"{prefix}.rec", "late", b'{"n": 1}', pika.BasicProperties(expiration="300", delivery_mode=2,
                                                                               message_id="m-9"), mandatory=True)
    conn.close()
    # When it expires there (the broker dead-letters it to the parking queue: quorum partitions)
    wait_until(lambda: queue_depth(amqp_url, f"{prefix}.rec.parked") == 1, 30, what="the broker expired it")
    # Then the operator sees what happened and how to stop it
    listed = ctlpool_cli(amqp_url, "parked", "show", "rec", "--prefix", prefix)
    assert listed.returncode == 0, listed.stderr
    assert "reason=broker:expired" in listed.stdout
    assert "per-message expiration (300 ms)" in listed.stdout and "publish without the 'expiration'" in listed.stdout
    assert "ctlpool parked replay rec --reason broker:expired" in listed.stdout
    # and when the pool runs again, the replay brings it back and it is reconciled (no expiration now)
    pool = make_pool(amqp_url, prefix, tmp_path, rec_dir).start()
    try:
        pool.wait_ready()
        replayed = ctlpool_cli(amqp_url, "parked", "replay", "rec", "--prefix", prefix, "--reason", "broker:expired")
        assert replayed.returncode == 0, replayed.stderr
        wait_until(lambda: any(r["k"] == "late" and r["r"] == "ok" for r in read_records(str(rec_dir))), 30,
                   what="the replayed event reconciled")
    finally:
        assert pool.stop() == 0
    assert queue_depth(amqp_url, f"{prefix}.rec.parked") == 0


@pytest.fixture
def users(amqp_url):
    """Two RabbitMQ users made for the test (deleted after it): a publisher and the pool's."""
    made: list[str] = []

    def add(name: str, configure: str, write: str, read: str) -> str:
        subprocess.run(["rabbitmqctl", "-q", "add_user", name, "pw"], check=True, capture_output=True, timeout=60)
        made.append(name)
        subprocess.run(["rabbitmqctl", "-q", "set_permissions", "-p", "/", name, configure, write, read], check=True,
                       capture_output=True, timeout=60)
        return amqp_url.replace("guest:guest", f"{name}:pw")
    yield add
    for name in made:
        subprocess.run(["rabbitmqctl", "-q", "delete_user", name], capture_output=True, timeout=60)


def readme_permissions(prefix: str) -> dict[str, tuple[str, str, str]]:
    """The permission regexes the README gives (for prefix ``ctl``), with this test's prefix."""
    text = (ROOT / "README.md").read_text()
    out = {}
    for line in text.splitlines():
        if line.startswith("rabbitmqctl set_permissions") and " ctlpool-" in line:
            parts = line.split("'")
            user = line.split()[4] if line.split()[2] == "-p" else line.split()[2]
            out[user] = tuple(p.replace(r"ctl\.", f"{prefix}\\.") for p in parts[1:6:2])
    return out


@pytest.mark.timeout(150)
def test_the_readme_permissions_let_a_publisher_use_the_ring_and_nothing_else(amqp_url, prefix, tmp_path, rec_dir,
                                                                              users):
    # Given the two users the README's permission model describes, with its exact regexes
    perms = readme_permissions(prefix)
    assert set(perms) == {"ctlpool-publisher", "ctlpool-pool"}, perms
    pub_url = users(f"{prefix}-publisher", *perms["ctlpool-publisher"])
    pool_url = users(f"{prefix}-pool", *perms["ctlpool-pool"])
    # When a pool runs as the pool's user, and the publisher publishes through the controller's exchange
    pool = make_pool(pool_url, prefix, tmp_path, rec_dir).start()
    try:
        pool.wait_ready()
        publish_many(pub_url, prefix, "rec", [(f"k{i}", {"n": 1}) for i in range(20)])
        wait_until(lambda: len({r["k"] for r in read_records(str(rec_dir))}) == 20, 30, what="all reconciled")
        # Then every other way in is refused to the publisher: the default exchange (to a partition
        # or the parking queue), the members exchange, a delay tier's exchange, declaring anything
        refused = []
        for exchange, key in (("", f"{prefix}.rec.p000"), ("", f"{prefix}.rec.parked"), (f"{prefix}.members", ""),
                              (f"{prefix}.rec.delay.1s", "k")):
            conn = _connect(pub_url)
            ch = conn.channel()
            try:
                ch.basic_publish(exchange, key, b"{}")
                ch.queue_declare("", exclusive=True)  # a round trip: the refusal arrives first
            except pika.exceptions.ChannelClosedByBroker as exc:
                refused.append(exc.reply_code)
            finally:
                if conn.is_open:
                    conn.close()
        assert refused == [403, 403, 403, 403]
        conn = _connect(pub_url)
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
            conn.channel().queue_declare(f"{prefix}.mine")
        assert info.value.reply_code == 403
        conn.close()
    finally:
        assert pool.stop() == 0
    assert parked_by_key(amqp_url, prefix) == {}


@pytest.mark.timeout(180)
def test_a_blocker_a_frame_sized_poison_and_cc_copies_in_one_run(amqp_url, prefix, tmp_path, rec_dir):
    # Given a pool of two workers with a 5 s heartbeat under steady load
    with under_load(amqp_url, prefix, tmp_path, rec_dir, "--heartbeat-s", "5", rate=200, sleep_ms=20) as (pool, load):
        parts = [f"{prefix}.rec.p{i:03d}" for i in range(PARTITIONS)]
        # When, in one run, a reconcile blocks its loop for 30 s (every time), an event 16 bytes under
        # frame_max fails every time, and a slow key's events come with CC copies through the
        # controller's exchange and through the default exchange
        publish_many(amqp_url, prefix, "rec", [("blocker", {"n": 1, "block_s": 30, "block_always": True})])
        foreign_publish(amqp_url, f"{prefix}.rec", [("huge", b'{"n": 1, "fail": 99}', blob_for(FRAME_MAX - 16))])
        for n in range(1, 11):
            body = f'{{"n": {n}, "sleep_ms": 300}}'.encode()
            exchange, cc = (f"{prefix}.rec", [f"o{i}" for i in range(16)]) if n % 2 else ("", parts)
            foreign_publish(amqp_url, exchange, [("slow", body, {"CC": cc})])
        wait_until(lambda: len(parked_by_key(amqp_url, prefix, keep=True)) == 2, 120, what="both poisons parked")
        wait_until(lambda: any(r["k"] == "slow" and r["r"] == "ok" and r["n"] == 10
                               for r in read_records(str(rec_dir))), 60, what="the slow key's last event")
    # Then (under_load checked every healthy key's last event and empty partitions) both poisons
    # were parked, for what they are, and nothing healthy
    parked = parked_by_key(amqp_url, prefix)
    assert {k: [h["x-ctlpool-reason"] for h in v] for k, v in parked.items()} == {
        "blocker": ["loop-blocked"], "huge": ["max-attempts"]}
    # and no key was reconciled twice at once (the blocking steps were cut short: none to except)
    records = read_records(str(rec_dir))
    assert overlaps(records) == [], overlaps(records)[:3]
    assert_latest_reconciled(records, {**load.per_key, "slow": 10})
    assert session_losses(pool) == [] and not logged(pool, "fencing")
