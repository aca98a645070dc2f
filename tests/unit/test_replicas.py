"""Reading where quorum queues are led and how many replicas are online (``pool.replicas``),
and how ``ctlpool status`` shows it, without a broker: rabbitmqctl's JSON as 3.10.8 prints it."""

from __future__ import annotations

from typing import Any

import pytest

from pool import replicas
from pool.replicas import Replicas, Unavailable, candidates, leaders_per_node, parse, parse_nodes, under_replicated
from pool.status import render

C1, C2, C3 = "ctlpool-c1@localhost", "ctlpool-c2@localhost", "ctlpool-c3@localhost"
DEV = "amqp://guest:guest@127.0.0.1:5681/%2F,amqp://guest:guest@127.0.0.1:5682/%2F"

# list_queues name type leader members online --formatter json, as 3.10.8 answers it
ROWS: list[dict[str, Any]] = [
    {"name": "ctl.rec.p000", "type": "quorum", "leader": C1, "members": [C1, C2, C3], "online": [C1, C2, C3]},
    {"name": "ctl.rec.p001", "type": "quorum", "leader": C2, "members": [C1, C2, C3], "online": [C2, C3]},
    {"name": "ctl.rec.parked", "type": "quorum", "leader": C2, "members": [C1, C2, C3], "online": [C2]},
    {"name": "ctl.rec.old", "type": "classic", "leader": "", "members": "", "online": ""},
    {"name": "other.q", "type": "quorum", "leader": C3, "members": [C3, C1], "online": [C3]},
]


def test_parse_keeps_quorum_queues_with_their_group() -> None:
    # Given the CLI's rows, a classic queue among them
    got = parse(ROWS)
    # Then each quorum queue has its leader and replicas; the classic one (no replicas) is left out
    assert set(got) == {"ctl.rec.p000", "ctl.rec.p001", "ctl.rec.parked", "other.q"}
    assert got["ctl.rec.p001"] == Replicas(C2, (C1, C2, C3), (C2, C3))
    assert got["ctl.rec.p001"].text() == "2/3" and got["ctl.rec.p001"].under
    assert not got["ctl.rec.p000"].under


def test_under_replicated_names_only_our_queues() -> None:
    got = parse(ROWS)
    # Then only queues under the prefix count, each with online/members
    assert under_replicated(got, "ctl.rec") == ["ctl.rec.p001 (2/3)", "ctl.rec.parked (1/3)"]
    assert under_replicated(got, "ctl.other") == []


def test_leaders_per_node_counts_the_given_queues() -> None:
    got = parse(ROWS)
    assert leaders_per_node(got, ["ctl.rec.p000", "ctl.rec.p001", "ctl.rec.p002"]) == {C1: 1, C2: 1}


def test_cluster_nodes_running_and_not() -> None:
    # Given cluster_status's JSON while one disk node is down
    nodes = parse_nodes({"running_nodes": [C2, C1], "disk_nodes": [C1, C2, C3], "ram_nodes": []})
    # Then it is listed as not running
    assert nodes.running == (C1, C2) and nodes.stopped == (C3,)


def test_which_node_is_asked() -> None:
    # --admin-node wins; the local dev cluster's URLs name its nodes; anything else: rabbitmqctl's default
    assert candidates("rabbit@mq1", DEV) == ["rabbit@mq1"]
    assert candidates(None, DEV) == [C1, C2]
    assert candidates(None, "amqp://u:p@mq1:5672/%2F,amqp://u:p@mq2:5672/%2F") == [None]


def test_an_unreachable_node_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given rabbitmqctl that cannot reach the node (no such node, or no cookie)
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(replicas.shutil, "which", lambda *a, **k: "/bin/false")
    # When the replicas are read
    with pytest.raises(Unavailable) as err:
        replicas.read("rabbit@nowhere", "amqp://u:p@mq1/%2F")
    # Then the error names the node and how to get access
    assert "rabbit@nowhere" in str(err.value) and "Erlang cookie" in str(err.value)


def _snapshot(**extra: Any) -> dict[str, Any]:
    part = {"partition": 1, "queue": "ctl.rec.p001", "exists": True, "owner": ["h/0"], "ready": 3, "unacked": 2,
            "consumers": 1, "leader": C2, "replicas": 3, "replicas_online": 2}
    return {"broker": "amqp://u:***@h/", "members": [],
            "controllers": [{"controller": "rec", "parked": 0, "partitions": [part],
                             "leaders_per_node": {C2: 1}, "under_replicated": ["ctl.rec.p001 (2/3)"]}], **extra}


def test_status_shows_each_partitions_leader_and_replicas_online() -> None:
    out = render(_snapshot())
    assert f"p001  owner h/0" in out and f"leader {C2} replicas 2/3" in out
    assert f"partition leaders per node: {C2} 1" in out
    assert "UNDER-REPLICATED (1 queues, replicas online/members): ctl.rec.p001 (2/3)" in out


def test_status_says_why_leaders_are_not_shown() -> None:
    out = render(_snapshot(replicas_error="rabbitmqctl is not installed here"))
    assert out.splitlines()[-1] == "partition leaders and replicas: not shown: rabbitmqctl is not installed here"
