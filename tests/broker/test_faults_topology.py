"""Topology faults: a first declaration cut short heals; another topology is refused, losing nothing.

The hardening issue: SIGTERM 0.3 s into the very first ``ctlpool run`` left 21 of 64 partitions
declared (the exchange bound to those 21 only). Every later ``run`` and ``topology`` exited 78
while publishes kept landing in the 21 queues, and the message advised deleting them. Here the
interruption is real (a ``ctlpool run`` or ``ctlpool topology`` subprocess signalled once some
partition queues exist), or, for states too brief to hit by a signal, built the way the
interrupted code leaves them. Completing it must end with the ring a fresh declaration builds
(the plugin numbers buckets in binding order, DESIGN fact 1): checked by routing the same keys
through a reference under a second prefix, its partitions bound in index order by the test.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Iterator

import pika.exceptions
import pytest

from pool.settings import TopologySettings
from pool.topology import Names, partition_args
from tests.helpers import ROOT, Pool, _connect, ctlpool_cli, delete, delete_prefix, publish_many, wait_until

CONTROLLER = "tests.ctl_fixtures:Recorder"
P = 64  # the default count, as in the issue
PROBE_KEYS = [f"key-{n}" for n in range(300)]  # ~5 per partition: a reordered ring moves many of them

pytestmark = [pytest.mark.broker, pytest.mark.timeout(240)]


@pytest.fixture
def fresh_prefix(amqp_url: str) -> Iterator[str]:
    """A second unique prefix, for a freshly declared topology to compare rings with."""
    p = f"t{uuid.uuid4().hex[:10]}"
    yield p
    delete_prefix(amqp_url, p)


def ctl(url: str, prefix: str, *args: str) -> subprocess.CompletedProcess[str]:
    return ctlpool_cli(url, *args, "--prefix", prefix)


def partition(prefix: str, i: int) -> str:
    return f"{prefix}.rec.p{i:03d}"


class Broker:
    """One blocking connection for many passive looks (a 404 closes only the channel)."""

    def __init__(self, url: str) -> None:
        self.conn = _connect(url)
        self.ch = self.conn.channel()

    def __enter__(self) -> "Broker":
        return self

    def __exit__(self, *_: object) -> None:
        if self.conn.is_open:
            self.conn.close()

    def depth(self, kind: str, name: str) -> int | None:
        """Ready messages of queue ``name`` (0 for an exchange); ``None`` if it does not exist."""
        try:
            ok = getattr(self.ch, f"{kind}_declare")(name, passive=True)
            return ok.method.message_count if kind == "queue" else 0
        except pika.exceptions.ChannelClosedByBroker as exc:
            assert exc.reply_code == 404, exc
            self.ch = self.conn.channel()
            return None

    def partitions(self, prefix: str, upto: int = P + 8) -> list[int]:
        return [i for i in range(upto) if self.depth("queue", partition(prefix, i)) is not None]

    def take_all(self, queue: str) -> list[str]:
        """Consume the messages ready in ``queue``; their routing keys (the item keys).

        A consumer, not basic.get: quorum partitions have single active consumer, which refuses gets."""
        keys: list[str] = []
        ready = self.depth("queue", queue) or 0
        if not ready:
            return keys
        for method, _props, _body in self.ch.consume(queue, auto_ack=True, inactivity_timeout=30):
            assert method is not None, f"{queue}: {len(keys)} of {ready} ready messages came"
            keys.append(method.routing_key)
            if len(keys) == ready:
                break
        self.ch.cancel()
        return keys


def bindings(prefix: str) -> list[str]:
    """Queues bound to the controller's exchange, one entry per binding (via rabbitmqctl)."""
    out = subprocess.run(["rabbitmqctl", "-q", "list_bindings", "source_name", "destination_name", "routing_key"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    rows = [line.split("\t") for line in out.splitlines()]
    return sorted(r[1] for r in rows if len(r) == 3 and r[0] == f"{prefix}.rec" and r[2] == "1")


def where(url: str, prefix: str, keys: list[str]) -> dict[str, int]:
    """Publish one event per key, then read which partition each landed in (drains the partitions)."""
    publish_many(url, prefix, "rec", [(k, {"probe": True}) for k in keys])
    out: dict[str, int] = {}
    with Broker(url) as b:
        for i in range(P):
            for k in b.take_all(partition(prefix, i)):
                out.setdefault(k, i)
    return out


def assert_ring_is_fresh(url: str, prefix: str, fresh_prefix: str) -> None:
    """Every probe key lands in the same partition as on a topology declared in one go.

    The reference is built here, not by the code under test: P queues bound in index order."""
    with Broker(url) as b:
        b.ch.exchange_declare(f"{fresh_prefix}.rec", "x-consistent-hash")
        for i in range(P):
            b.ch.queue_declare(partition(fresh_prefix, i))
            b.ch.queue_bind(partition(fresh_prefix, i), f"{fresh_prefix}.rec", routing_key="1")
    assert where(url, prefix, PROBE_KEYS) == where(url, fresh_prefix, PROBE_KEYS)


def marked_clean(url: str, prefix: str) -> list[int]:
    """Partitions whose ring-drift clean marker exists."""
    with Broker(url) as b:
        return [i for i in range(P) if b.depth("exchange", f"{partition(prefix, i)}.clean") is not None]


def cli(url: str, prefix: str, *args: str) -> subprocess.Popen[str]:
    """``ctlpool ARGS --prefix PREFIX`` started, not awaited (stderr piped)."""
    env = {**os.environ, "CTLPOOL_AMQP_URL": url, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "pool.cli", *args, "--prefix", prefix], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def interrupt(url: str, prefix: str, sig: int, cmd: list[str], log: Path) -> int:
    """Start a first declaration of ``P`` partitions, send ``sig`` once three partition queues
    exist, and return how many it had made (checked to be some, not all, in index order)."""
    with Broker(url) as b:
        if cmd == ["run"]:
            proc = Pool(url, prefix, CONTROLLER, "--partitions", str(P), "--workers", "1", log_path=log).start().proc
        else:
            proc = cli(url, prefix, *cmd)
        assert proc is not None
        try:
            wait_until(lambda: b.depth("queue", partition(prefix, 2)) is not None, timeout=60, interval=0.005,
                       what="the first partition queues")
            proc.send_signal(sig)
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        made = b.partitions(prefix)
    k = len(made)
    assert made == list(range(k)) and 3 <= k < P, f"the interruption missed: partitions {made}"
    return k


def build_partial(url: str, prefix: str, bound: int, unbound: int, markers: bool) -> None:
    """The state a declaration leaves when cut short between two of its steps: the exchange, then
    ``bound`` partition queues each bound in index order, then ``unbound`` declared but not bound;
    with ``markers``, each bound one marked clean as the version in the issue did right away."""
    names = Names(prefix, "rec")
    args = partition_args(names, TopologySettings(partitions=P))
    with Broker(url) as b:
        b.ch.exchange_declare(names.exchange, "x-consistent-hash", durable=True)
        for i in range(bound + unbound):
            b.ch.queue_declare(names.partition(i, P), durable=True, arguments=args)
            if i < bound:
                b.ch.queue_bind(names.partition(i, P), names.exchange, routing_key="1")
            if i < bound and markers:
                b.ch.exchange_declare(names.clean_marker(i, P), "fanout", durable=False)


def assert_no_advice_to_lose_events(stderr: str, held: int) -> None:
    """Deleting queues is advised only after moving what they hold, and the count is said."""
    if "delete" in stderr:
        assert f"first move or drain the {held} messages" in stderr, stderr
        assert stderr.index("move or drain") < stderr.index("delete"), stderr


def test_a_first_run_stopped_midway_is_completed_by_the_next_topology(amqp_url, prefix, fresh_prefix, tmp_path):
    # Given the very first `ctlpool run` SIGTERMed while it declares its 64 partitions
    k = interrupt(amqp_url, prefix, signal.SIGTERM, ["run"], tmp_path / "first.log")
    # And events published meanwhile: they land in the partitions made so far
    early = [f"early-{n}" for n in range(40)]
    publish_many(amqp_url, prefix, "rec", [(key, {"n": n}) for n, key in enumerate(early)])

    # When the controller is declared again
    again = ctl(amqp_url, prefix, "topology", "rec", "--partitions", str(P))

    # Then it completes the topology: every partition exists, bound once
    assert again.returncode == 0, again.stderr
    assert bindings(prefix) == [partition(prefix, i) for i in range(P)]
    with Broker(amqp_url) as b:
        assert b.partitions(prefix) == list(range(P))
        # And the events published before are all still there, in the partitions made before
        assert sum(b.depth("queue", partition(prefix, i)) or 0 for i in range(k)) == len(early)
        held = sorted(key for i in range(k) for key in b.take_all(partition(prefix, i)))
        assert held == sorted(early)
    # And only the partitions made now are marked clean: the earlier ones hold events routed
    # by a ring of k partitions, which their first owner must re-route
    assert marked_clean(amqp_url, prefix) == list(range(k, P))
    # And a key routes as on a topology declared in one go
    assert_ring_is_fresh(amqp_url, prefix, fresh_prefix)


def test_two_declarations_complete_an_interrupted_one_together(amqp_url, prefix, fresh_prefix, tmp_path):
    # Given a first `ctlpool topology` killed while it declares its partitions
    interrupt(amqp_url, prefix, signal.SIGKILL, ["topology", "rec", "--partitions", str(P)], tmp_path / "x.log")

    # When two declarations run at once (two pools starting)
    both = [cli(amqp_url, prefix, "topology", "rec", "--partitions", str(P)) for _ in range(2)]
    results = [(p.wait(60), p.stderr.read() if p.stderr else "") for p in both]

    # Then both succeed, each partition is bound once, and the ring is the fresh one
    assert [code for code, _ in results] == [0, 0], results
    assert bindings(prefix) == [partition(prefix, i) for i in range(P)]
    assert_ring_is_fresh(amqp_url, prefix, fresh_prefix)


@pytest.mark.parametrize(("bound", "unbound", "markers"), [(0, 0, False), (5, 1, False), (21, 0, True)],
                         ids=["exchange-only", "last-queue-unbound", "as-in-the-issue-with-clean-markers"])
def test_a_declaration_cut_between_two_steps_is_completed(amqp_url, prefix, fresh_prefix, bound, unbound, markers):
    # Given what a first declaration leaves when cut right after declaring the exchange, or
    # between declaring a partition queue and binding it, or (as in the issue) after 21
    # partitions, each marked clean at once by the version of then
    build_partial(amqp_url, prefix, bound, unbound, markers)

    # When the controller is declared
    r = ctl(amqp_url, prefix, "topology", "rec", "--partitions", str(P))

    # Then the topology is complete, each partition bound once
    assert r.returncode == 0, r.stderr
    assert bindings(prefix) == [partition(prefix, i) for i in range(P)]
    # And only the partitions made now are marked clean (the ring changed under the others)
    assert marked_clean(amqp_url, prefix) == list(range(bound + unbound, P))
    # And a key routes as on a topology declared in one go
    assert_ring_is_fresh(amqp_url, prefix, fresh_prefix)


@pytest.mark.parametrize(("made", "asked"), [(4, 8), (8, 4)])
@pytest.mark.parametrize("made_by", ["this ctlpool", "a ctlpool before layouts"])
def test_a_complete_topology_of_another_size_is_followed_and_its_events_kept(amqp_url, prefix, made, asked, made_by):
    # Given controller "rec" declared completely with `made` partitions, holding 3 events (by a
    # ctlpool that wrote no layout: its count is read off the queues)
    assert ctl(amqp_url, prefix, "topology", "rec", "--partitions", str(made)).returncode == 0
    if made_by != "this ctlpool":
        delete(amqp_url, [f"{prefix}.rec.layout"], [])
    publish_many(amqp_url, prefix, "rec", [(f"k{n}", {"n": n}) for n in range(3)])

    # When it is declared with another count
    r = ctl(amqp_url, prefix, "topology", "rec", "--partitions", str(asked))

    # Then the live count is followed, and said: the flag is for new controllers
    assert r.returncode == 0, r.stderr
    assert f"{made} partitions, layout version 1" in r.stdout, r.stdout
    # And nothing changed: no partition added or taken away, the events still there
    with Broker(amqp_url) as b:
        assert b.partitions(prefix) == list(range(made))
        assert sum(b.depth("queue", partition(prefix, i)) or 0 for i in range(made)) == 3


def test_an_unfinished_declaration_of_more_partitions_is_refused_then_completed(amqp_url, prefix, tmp_path):
    # Given a first `ctlpool topology` of 64 partitions killed after making some (3 or more)
    k = interrupt(amqp_url, prefix, signal.SIGKILL, ["topology", "rec", "--partitions", str(P)], tmp_path / "x.log")
    publish_many(amqp_url, prefix, "rec", [(f"k{n}", {"n": n}) for n in range(5)])

    # When it is declared with 2 partitions: queues beyond that count are bound already
    r = ctl(amqp_url, prefix, "topology", "rec", "--partitions", "2")

    # Then that is refused, without advice to lose the 5 events, and nothing is added
    assert r.returncode == 78, r.stderr
    assert "different number of partitions" in r.stderr and "did not finish" in r.stderr
    assert_no_advice_to_lose_events(r.stderr, held=5)
    with Broker(amqp_url) as b:
        assert b.partitions(prefix) == list(range(k))
        assert b.depth("queue", f"{prefix}.rec.parked") is None

    # When it is declared with the count it was started with
    r = ctl(amqp_url, prefix, "topology", "rec", "--partitions", str(P))
    # Then that completes it, keeping the events
    assert r.returncode == 0, r.stderr
    with Broker(amqp_url) as b:
        assert b.partitions(prefix) == list(range(P))
        assert sum(b.depth("queue", partition(prefix, i)) or 0 for i in range(P)) == 5


def test_a_gap_in_an_unfinished_declaration_is_refused(amqp_url, prefix):
    # Given a declaration cut short after 6 partitions, whose p002 was deleted since
    build_partial(amqp_url, prefix, bound=6, unbound=0, markers=False)
    delete(amqp_url, [partition(prefix, 2)], [])

    # When it is declared again
    r = ctl(amqp_url, prefix, "topology", "rec", "--partitions", "8")

    # Then that is refused: completing it would bind p002 after p005 on the ring
    assert r.returncode == 78, r.stderr
    assert partition(prefix, 2) in r.stderr and "re-route keys" in r.stderr
    with Broker(amqp_url) as b:
        assert b.depth("queue", partition(prefix, 2)) is None


def test_a_partition_deleted_from_a_complete_topology_is_declared_again(amqp_url, prefix):
    # Given a complete controller of 8 partitions whose (empty) p005 was deleted by hand (the
    # broker dropped its binding with it: the ring has already changed)
    assert ctl(amqp_url, prefix, "topology", "rec", "--partitions", "8").returncode == 0
    delete(amqp_url, [partition(prefix, 5)], [])
    # And 2 events published since, held by the other partitions
    publish_many(amqp_url, prefix, "rec", [("a", {}), ("b", {})])

    # When it is declared again (what a worker's "does not exist" line tells the operator to run)
    r = ctl(amqp_url, prefix, "topology", "rec", "--partitions", "8")

    # Then p005 exists and is bound again, and the events are still where they were
    assert r.returncode == 0, r.stderr
    assert sorted(bindings(prefix)) == sorted(partition(prefix, i) for i in range(8))
    with Broker(amqp_url) as b:
        assert sum(b.depth("queue", partition(prefix, i)) or 0 for i in range(8)) == 2
