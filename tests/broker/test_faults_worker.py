"""Fault injection against a real pool: hostile headers and bodies, connection flaps, a frozen
worker, a blocked event loop, reconciles that misbehave, a parking queue that refuses.

Each test counts every event (per key, the last event published must be the last reconciled),
records when every reconcile starts (a cancelled one too) for the overlap check, and looks at
what was parked and why. Sizes fit the 2-core box: a few hundred keys at ~200-400 events/s.
"""

from __future__ import annotations

import os
import re
import signal
import struct
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pika
import pika.data
import pytest

from tests.ctl_fixtures import overlaps, read_records
from tests.helpers import Pool, _connect, get_all, peek_all, publish_many, queue_depth, wait_until
from tests.load import Load, assert_latest_reconciled, assert_none_lost

pytestmark = pytest.mark.broker

PARTITIONS = 8


class Raw(bytes):
    """A header value given as its AMQP field encoding (type byte + payload): what another
    client library sends and pika cannot (doubles, out-of-range timestamps)."""


def double(x: float) -> Raw:
    return Raw(b"d" + struct.pack(">d", x))


def timestamp(seconds: int) -> Raw:
    return Raw(b"T" + struct.pack(">Q", seconds))


def foreign_publish(url: str, exchange: str, messages: list[tuple[str, bytes, dict[str, Any]]]) -> None:
    """Publish as a non-pika client would, with confirms (encode_value taught ``Raw`` for this call)."""
    original = pika.data.encode_value

    def encode_value(pieces: list[bytes], value: Any) -> int:
        if isinstance(value, Raw):
            pieces.append(bytes(value))
            return len(value)
        return original(pieces, value)

    pika.data.encode_value = encode_value
    try:
        conn = _connect(url)
        ch = conn.channel()
        ch.confirm_delivery()
        for key, body, headers in messages:
            ch.basic_publish(exchange, key, body, pika.BasicProperties(headers=headers, delivery_mode=2),
                             mandatory=True)
        conn.close()
    finally:
        pika.data.encode_value = original


def make_pool(url: str, prefix: str, tmp_path: Path, rec_dir: Path, *args: str) -> Pool:
    return Pool(url, prefix, "tests.ctl_fixtures:Recorder", "--workers", "2", "--partitions", str(PARTITIONS),
                *args, env={"CTLPOOL_TEST_RECORD_DIR": str(rec_dir), "CTLPOOL_TEST_BASE_S": "0.5"},
                log_path=tmp_path / "pool.log")


@pytest.fixture
def rec_dir(tmp_path: Path) -> Path:
    d = tmp_path / "rec"
    d.mkdir()
    return d


def parked_by_key(url: str, prefix: str, keep: bool = False) -> dict[str, list[dict[str, Any]]]:
    """What the parking queue holds, by key; taken out of it unless ``keep`` (then only looked at)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for _, props, _ in (peek_all if keep else get_all)(url, f"{prefix}.rec.parked"):
        out.setdefault(props.headers["x-ctlpool-key"], []).append(props.headers)
    return out


def session_losses(pool: Pool) -> list[str]:
    return [e["msg"] for e in pool.logs() if "broker session failed" in e["msg"]]


def logged(pool: Pool, text: str) -> bool:
    return any(text in e["msg"] for e in pool.logs())


@contextmanager
def under_load(url: str, prefix: str, tmp_path: Path, rec_dir: Path, *args: str, rate: int = 200,
               sleep_ms: int = 300, check: Callable[..., None] = assert_latest_reconciled
               ) -> Iterator[tuple[Pool, Load]]:
    """A ready pool under ``Load`` for the ``with`` body (the fault); afterwards the load stops,
    the pool gets until ``check`` (the loss check) holds, and is stopped. Where partitions may
    still be changing hands when the load stops, order isn't kept: use ``assert_none_lost``."""
    pool = make_pool(url, prefix, tmp_path, rec_dir, *args).start()
    try:
        pool.wait_ready()
        with Load(url, prefix, rate=rate, hot=24, sleep_ms=sleep_ms) as load:
            wait_until(lambda: load.published > 2 * rate, 30, what="load running")
            yield pool, load
        wait_until(lambda: _holds(check, rec_dir, load.per_key), 90, what="no event lost")
        # liveness: nothing is left waiting in, or held unacked from, any partition, and no worker's
        # bookkeeping ever needed the stall watchdog
        wait_until(lambda: partition_messages(prefix) == 0, 30, what="nothing left held in the partitions")
        stalls = [e["msg"] for e in pool.logs() if "stalled" in e["msg"] or "for a fresh one" in e["msg"]]
        assert stalls == [], stalls[:3]
    finally:
        pool.stop()


def partition_messages(prefix: str) -> int:
    """Messages in the controller's partitions, ready and unacked (rabbitmqctl: AMQP counts only ready)."""
    out = subprocess.run(["rabbitmqctl", "-q", "list_queues", "name", "messages"], capture_output=True, text=True,
                         timeout=60).stdout
    return sum(int(line.split()[-1]) for line in out.splitlines() if re.match(rf"{prefix}\.rec\.p\d+\s", line))


@pytest.mark.timeout(150)
def test_hostile_headers_and_bodies_touch_only_themselves(amqp_url, prefix, tmp_path, rec_dir):
    # Given a pool under a steady load of healthy events
    with under_load(amqp_url, prefix, tmp_path, rec_dir, rate=300, sleep_ms=20) as (pool, load):
        # When a foreign publisher sends, among them, every header and body that used to
        # abort the connection or break the confirm numbering
        deep = b"[" * 5000 + b"]" * 5000
        foreign_publish(amqp_url, f"{prefix}.rec", [
            ("bad-double", b'{"n": 1, "fail": 99}', {"x-foo": double(1e19)}),  # retried, then parked
            # (a NaN double never reaches us: RabbitMQ 3.10 closes the publisher's connection, 541)
            ("bad-time", b'{"n": 1}', {"x-when": timestamp(2**62)}),  # a header pika can't read: dropped
            ("ms-time", b'{"n": 1}', {"x-sent": timestamp(1_733_650_000_000)}),  # milliseconds: year 56,906
            ("bad-deep", deep, {}),
            ("bad-redeliveries", b'{"n": 1}', {"x-ctlpool-redeliveries": "abc"}),
            ("bad-delay", b'{"n": 1}', {"x-ctlpool-delay-ms": double(1e19)}),
            ("bad-attempt", b'{"n": 1}', {"x-ctlpool-attempt": "abc"}),
            ("neg-attempt", b'{"n": 1, "fail": 99}', {"x-ctlpool-attempt": -5}),
        ])
        wait_until(lambda: queue_depth(amqp_url, f"{prefix}.rec.parked") >= 3, 60, what="poison parked")
    assert pool.stop() == 0  # (stopped by under_load: this reads its exit code)
    # Then only the poison is parked, each once, with its reason; nothing healthy was touched
    parked = parked_by_key(amqp_url, prefix)
    assert sorted(parked) == ["bad-deep", "bad-double", "neg-attempt"], parked
    assert all(len(v) == 1 for v in parked.values()), parked
    assert parked["bad-deep"][0]["x-ctlpool-reason"] == "undecodable"
    assert parked["bad-double"][0]["x-ctlpool-reason"] == "max-attempts"
    assert parked["bad-double"][0]["x-ctlpool-dropped-headers"] == "x-foo"  # named, not carried
    # a negative attempt bought nothing: parked after the policy's 4 attempts, as from 0
    tries = [r for r in read_records(str(rec_dir)) if r["k"] == "neg-attempt"]
    assert [r["a"] for r in tries] == [0, 1, 2, 3]
    # the harmless-once-decoded ones were reconciled (an unreadable header dropped: not poison);
    # the forged bookkeeping was ignored
    records = read_records(str(rec_dir))
    done = {r["k"] for r in records if r["r"] == "ok"}
    assert {"bad-redeliveries", "bad-delay", "bad-attempt", "bad-time", "ms-time"} <= done
    assert_latest_reconciled(records, load.per_key)
    assert overlaps(records) == []
    assert session_losses(pool) == []  # no delivery took a connection down


def _holds(check: Callable[..., None], rec_dir: Path, per_key: dict[str, int]) -> bool:
    try:
        check(read_records(str(rec_dir)), per_key)
        return True
    except AssertionError:
        return False


@pytest.mark.timeout(150)
def test_connection_flaps_park_no_healthy_event(amqp_url, prefix, tmp_path, rec_dir):
    # Given a pool under more load than it drains (4 reconciles of 100 ms at a time per worker):
    # a backlog, so the same prefetched deliveries are in flight at flap after flap
    with under_load(amqp_url, prefix, tmp_path, rec_dir, "--prefetch", "50", "--concurrency", "4",
                    rate=200, sleep_ms=100) as (pool, load):
        # When the broker closes every connection four times, 3.5 s apart (a delivery in flight at
        # each is delivered 5 times: over --max-deliveries 3, were every redelivery counted)
        for _ in range(4):
            wait_until(lambda: _consumers(prefix) >= PARTITIONS, 30, what="partitions consumed again")
            subprocess.run(["rabbitmqctl", "-q", "close_all_connections", "flap test"], check=True,
                           capture_output=True, timeout=60)
            time.sleep(3.5)  # the fault's own rhythm (the scenario), not a synchronisation
    # Then nothing healthy was parked, nothing lost, no key reconciled twice at once
    assert parked_by_key(amqp_url, prefix) == {}
    records = read_records(str(rec_dir))
    assert_latest_reconciled(records, load.per_key)
    assert overlaps(records) == []
    assert len(session_losses(pool)) >= 4  # the flaps really hit the workers


def _consumers(prefix: str) -> int:
    out = subprocess.run(["rabbitmqctl", "-q", "list_queues", "name", "consumers"], capture_output=True,
                         text=True, timeout=60).stdout
    return sum(1 for line in out.splitlines()
               if line.startswith(f"{prefix}.rec.p") and line.split()[-1] != "0")


@pytest.mark.timeout(180)
def test_a_frozen_worker_takes_no_step_after_its_lease(amqp_url, prefix, tmp_path, rec_dir):
    # Given two workers with a 5 s heartbeat and 4 reconciles at a time, reconciles that wait (all
    # slots busy and keys waiting for them: a finishing reconcile starts the next from its own task)
    with under_load(amqp_url, prefix, tmp_path, rec_dir, "--heartbeat-s", "5", "--concurrency", "4",
                    sleep_ms=25, check=assert_none_lost) as (pool, load):
        # When one worker, in the middle of slow reconciles, is frozen (SIGSTOP) for 25 s while the
        # other takes its partitions
        frozen = pool.worker_pids()[0]
        publish_many(amqp_url, prefix, "rec", [(f"long{i}", {"n": 1, "sleep_ms": 5000, "mark_start": True})
                                               for i in range(8)])
        wait_until(lambda: any(r["k"].startswith("long") and r["pid"] == frozen and r["r"] == "start"
                               for r in read_records(str(rec_dir))), 30, what="a slow reconcile on the worker to freeze")
        os.kill(frozen, signal.SIGSTOP)
        try:
            time.sleep(25)  # the fault itself: a 25 s freeze (a paused VM), not a synchronisation
        finally:
            os.kill(frozen, signal.SIGCONT)
        wait_until(lambda: logged(pool, "fencing"), 30, what="the thawed worker fences")
        fenced_at = time.monotonic_ns()
        # and reconciles again under the load (before the fix a worker could hold its partitions for good)
        wait_until(lambda: any(r["pid"] == frozen and r["r"] == "ok" and r["s"] > fenced_at
                               for r in read_records(str(rec_dir))), 60, what="the thawed worker reconciling")
    # Then none of its in-flight reconciles took another step next to the new owner's
    records = read_records(str(rec_dir))
    assert overlaps(records) == [], overlaps(records)[:5]
    assert any(r["r"] == "cancelled" and r["pid"] == frozen for r in records)  # it had work in flight
    assert_none_lost(records, load.per_key)
    assert {f"long{i}" for i in range(8)} <= {r["k"] for r in records if r["r"] == "ok"}  # the slow ones too
    assert parked_by_key(amqp_url, prefix) == {}


@pytest.mark.timeout(150)
def test_a_loop_blocker_is_interrupted_retried_with_backoff_and_parked(amqp_url, prefix, tmp_path, rec_dir):
    # Given two workers with a 5 s heartbeat (a 2.5 s lease) under load
    with under_load(amqp_url, prefix, tmp_path, rec_dir, "--heartbeat-s", "5") as (pool, load):
        # When one event's reconcile blocks its worker's event loop for 30 s, every time (time.sleep
        # in an async def)
        publish_many(amqp_url, prefix, "rec", [("block1", {"n": 1, "block_s": 30, "block_always": True,
                                                           "mark_start": True})])
        wait_until(lambda: "block1" in parked_by_key(amqp_url, prefix, keep=True), 90, what="the blocker parked")
    # Then each block was cut short before the lease ran out, named, and blamed: retried with backoff
    # through the delay tiers (never bounced at once), then parked as loop-blocked at --max-deliveries 3
    everything = parked_by_key(amqp_url, prefix)
    assert set(everything) == {"block1"}, everything  # nothing healthy parked
    (parked,) = everything["block1"]
    assert parked["x-ctlpool-reason"] == "loop-blocked", parked
    assert "held the event loop for" in parked["x-ctlpool-error"] and "3 of --max-deliveries 3" in parked["x-ctlpool-error"]
    records = read_records(str(rec_dir))
    starts = sorted(r["s"] for r in records if r["k"] == "block1" and r["r"] == "start")
    assert len(starts) == 3, starts
    gaps = [(b - a) / 1e9 for a, b in zip(starts, starts[1:])]
    assert all(g > 2.0 for g in gaps), gaps  # blocked ~2 s, then waited out its retry delay in a tier
    slow = [e for e in pool.logs() if "held the event loop" in e["msg"]]
    assert slow and {e["key"] for e in slow} == {"block1"}
    # no worker had to fence itself or lost its session: the lease was kept, nothing else cancelled
    assert not logged(pool, "fencing") and session_losses(pool) == []
    assert not [r for r in records if r["r"] == "cancelled"]
    # the rest of the pool kept working all along: no pause of a second and a half in healthy reconciles
    ends = sorted(r["e"] for r in records if r["k"] != "block1" and r["r"] == "ok" and starts[0] <= r["e"] <= starts[-1])
    assert ends and max((b - a) / 1e9 for a, b in zip(ends, ends[1:])) < 1.5
    # nothing lost, no key reconciled twice at once
    assert overlaps([r for r in records if r["r"] != "start"]) == []
    assert_latest_reconciled(records, load.per_key)


@pytest.mark.timeout(120)
def test_misbehaving_reconciles_are_failures_never_stuck(amqp_url, prefix, tmp_path, rec_dir):
    # Given a pool
    pool = make_pool(amqp_url, prefix, tmp_path, rec_dir).start()
    try:
        pool.wait_ready()
        # When reconciles raise SystemExit / KeyboardInterrupt / BaseException, or return an
        # invalid Result or a string
        bad = {"exit": {"raise": "SystemExit"}, "intr": {"raise": "KeyboardInterrupt"},
               "base": {"raise": "BaseException"}, "nan": {"result": "nan"}, "str": {"result": "str"}}
        publish_many(amqp_url, prefix, "rec", [(k, {"n": 1, **v}) for k, v in bad.items()] + [("fine", {"n": 1})])
        # Then each is retried and parked with what it did; the workers never died
        wait_until(lambda: queue_depth(amqp_url, f"{prefix}.rec.parked") >= len(bad), 90, what="all parked")
        assert any(r["k"] == "fine" and r["r"] == "ok" for r in read_records(str(rec_dir)))
    finally:
        assert pool.stop() == 0
    parked = parked_by_key(amqp_url, prefix)
    assert sorted(parked) == sorted(bad)
    assert all(h[0]["x-ctlpool-reason"] == "max-attempts" for h in parked.values())
    assert "SystemExit" in parked["exit"][0]["x-ctlpool-error"]
    assert "KeyboardInterrupt" in parked["intr"][0]["x-ctlpool-error"]
    assert "ValueError" in parked["nan"][0]["x-ctlpool-error"]
    assert "TypeError: reconcile returned str" in parked["str"][0]["x-ctlpool-error"]
    assert not [e for e in pool.logs() if "died" in e["msg"]]


@pytest.mark.timeout(120)
def test_a_refused_park_returns_the_event_never_acks_it(amqp_url, prefix, tmp_path, rec_dir):
    # Given a parking queue that is full and refuses every further message (reject-publish). Classic
    # queues, because a quorum queue applies the limit late and per publisher: a worker's first park
    # there can still get in (measured: 1 or 2 of 3 did), so how many are refused is left to chance
    policy = f"{prefix}-park1"
    subprocess.run(["rabbitmqctl", "-q", "set_policy", policy, f"^{prefix}\\.rec\\.parked$",
                    '{"max-length":1,"overflow":"reject-publish"}', "--apply-to", "queues"],
                   check=True, capture_output=True, timeout=60)
    pool = make_pool(amqp_url, prefix, tmp_path, rec_dir, "--queue-type", "classic").start()
    parked = f"{prefix}.rec.parked"
    try:
        pool.wait_ready()
        foreign_publish(amqp_url, "", [(parked, b"{}", {})])
        wait_until(lambda: queue_depth(amqp_url, parked) == 1, 10, what="the parking queue full")
        # When three permanent failures (one with a header pika can't re-encode) must be parked
        foreign_publish(amqp_url, f"{prefix}.rec", [
            (f"perm{i}", b'{"n": 1, "permanent": true}', {"x-foo": double(1e19)}) for i in range(3)])
        # Then each refused park returns its event to its queue, which delivers it again, to be
        # refused again (a return comes 5 s after the refusal): each key refused twice at least
        def refusals() -> Counter[str]:
            return Counter(e.get("key") for e in pool.logs() if "could not settle" in e["msg"])
        wait_until(lambda: all(refusals()[f"perm{i}"] >= 2 for i in range(3)), 60, what="each park refused twice")
        assert sum(1 for e in pool.logs() if "returning the delivery" in e["msg"]) >= 6
    finally:
        assert pool.stop() == 0
        subprocess.run(["rabbitmqctl", "-q", "clear_policy", policy], capture_output=True, timeout=60)
    # and none of the three was acked or got in: all three are back in their partitions
    left = sum(queue_depth(amqp_url, f"{prefix}.rec.p{i:03d}") for i in range(PARTITIONS))
    assert (queue_depth(amqp_url, parked), left) == (1, 3)


@pytest.mark.timeout(60)
def test_an_unencodable_publish_fails_alone_and_the_numbering_holds(amqp_url, prefix):
    # Given a confirm channel and an exchange
    import asyncio

    from pool.amqp import connect
    from pool.errors import PublishError

    async def go() -> None:
        conn = await connect(amqp_url, name="test")
        ch = await conn.confirm_channel()
        await ch.ch.rpc("queue_declare", queue=f"{prefix}.q", auto_delete=True)
        try:
            # When one publish can't be encoded, between two that can
            first = ch.publish("", f"{prefix}.q", b"1")
            broken = ch.publish("", f"{prefix}.q", b"2", {"x-big": 10**19})
            last = ch.publish("", f"{prefix}.q", b"3")
            # Then only it fails, at once, and the broker's confirms still match their publishes
            with pytest.raises(PublishError):
                await asyncio.wait_for(broken, 10)
            await asyncio.wait_for(asyncio.gather(first, last), 10)  # a desynced numbering never confirms ``last``
            assert ch.unconfirmed == 0
        finally:
            conn.close()

    asyncio.run(go())


@pytest.mark.timeout(60)
def test_a_release_racing_the_acquisition_leaves_no_consumer_on_the_broker(amqp_url, prefix):
    # Given one worker's rooms on a real session (in this process, so the race can be timed)
    import asyncio

    from pool import topology
    from pool.settings import resolve
    from pool.worker import Worker
    from pool.worker.session import Session
    from tests.ctl_fixtures import Recorder

    async def go() -> int:
        settings = resolve({"amqp-url": amqp_url, "prefix": prefix, "partitions": PARTITIONS, "node-id": "race"},
                           env={})
        await topology.ensure(settings.broker, settings.topology, ["rec"])
        worker = Worker(settings=settings, controllers=[Recorder()])
        settler, _intake, _dispatch, ownership = worker._build(asyncio.get_running_loop())
        conns: list[Any] = []
        session = await Session.open(settings.broker, "race/0", on_heartbeat=lambda *a: None,
                                     on_lease_lost=lambda why: None, clock=time.monotonic, opened=conns)
        settler.pub = session.pub
        ownership.bind(session)
        try:
            # When the partition is released while its acquisition waits for the broker's channel
            acquiring = asyncio.ensure_future(ownership.acquire(worker.ctls[0], 0))
            await asyncio.sleep(0)  # one loop turn: it has asked for a channel, not got it
            await ownership.release(ownership.parts[(0, 0)])
            await acquiring
            # Then, both finished, the broker knows no consumer of that partition (one would hold a
            # prefetch of deliveries for nobody, for the rest of the session)
            ch = await session.consume.channel()
            ok = await ch.rpc("queue_declare", queue=f"{prefix}.rec.p000", passive=True)
            return int(ok.method.consumer_count)
        finally:
            for conn in conns:
                conn.close()

    assert asyncio.run(go()) == 0


@pytest.mark.timeout(120)
def test_a_forged_member_never_leaves_a_partition_unconsumed(amqp_url, prefix, tmp_path, rec_dir):
    import threading

    from pool import membership

    # Given a pool of two workers under load
    with under_load(amqp_url, prefix, tmp_path, rec_dir, rate=200, sleep_ms=20) as (pool, load):
        # When someone publishes heartbeats on the members exchange for 15 s, of a member that does
        # not exist and so consumes nothing (it would get a third of the partitions)
        stop = threading.Event()
        ghost = membership.Heartbeat(id="ghost/0", node="ghost", worker=0, weight=1.0, started=time.time(),
                                     controllers=("rec",), pid=4242)

        def forge() -> None:
            conn = _connect(amqp_url)
            ch = conn.channel()
            while not stop.wait(0.5):
                ch.basic_publish(f"{prefix}.members", "", membership.encode(ghost))
            conn.close()
        forger = threading.Thread(target=forge, daemon=True)
        forger.start()
        # Then, sampled every 0.2 s all along, every partition always has its active consumer
        unconsumed: list[str] = []
        conn = _connect(amqp_url)
        ch = conn.channel()
        deadline = time.monotonic() + 15
        try:
            while time.monotonic() < deadline:
                for i in range(PARTITIONS):
                    q = f"{prefix}.rec.p{i:03d}"
                    if ch.queue_declare(q, passive=True).method.consumer_count == 0:
                        unconsumed.append(q)
                time.sleep(0.2)
        finally:
            stop.set()
            forger.join(5)
            conn.close()
        assert unconsumed == [], unconsumed[:10]
        # and the forged member was named once it had held nothing for the grace period
        wait_until(lambda: logged(pool, "member ghost/0"), 10, what="the forged member named")
    records = read_records(str(rec_dir))
    assert overlaps(records) == []
    assert parked_by_key(amqp_url, prefix) == {}
