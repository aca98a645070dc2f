"""pool.urls: a cluster's URL list, how a process walks it, and what is refused."""

from __future__ import annotations

import random

import pytest

from pool.urls import Nodes, parse_urls, vhost

A, B, C = (f"amqp://u:p@10.0.0.{i}:5672/prod" for i in (1, 2, 3))


def test_a_list_is_shuffled_per_process_and_walked_from_a_cursor():
    firsts = {Nodes([A, B, C], random.Random(seed)).order()[0] for seed in range(30)}
    assert firsts == {A, B, C}  # processes start at different nodes
    n = Nodes([A, B, C], random.Random(1))
    start = n.order()
    assert sorted(start) == sorted([A, B, C])
    # a node that refused or dropped us: the next connect starts at the following one
    n.failed(start[0])
    assert n.order() == start[1:] + start[:1]
    # a failure of a node we are not on does not move the cursor
    n.failed(start[0])
    assert n.order()[0] == start[1]
    # a node that works keeps the cursor
    n.worked(start[2])
    assert n.order()[0] == start[2]


def test_one_url_is_a_list_of_one():
    n = Nodes([A], random.Random(0))
    n.failed(A)
    assert n.order() == [A]


def test_every_node_shares_one_vhost():
    assert parse_urls(f" {A} ,\n{B}") == f"{A},{B}"
    with pytest.raises(ValueError, match="share one vhost"):
        parse_urls(f"{A},amqp://u:p@10.0.0.2:5672/other")
    assert vhost("amqp://h") == vhost("amqp://h/") == vhost("amqp://h/%2F") == "/"
    assert vhost("amqp://h/a%2Fb") == "a/b"


def test_reconnect_backoff_doubles_resets_and_skips_the_wait_on_a_cluster():
    from pool.worker.session import RECONNECT_FIRST_S, Backoff

    one = Backoff(4.0, rand=lambda: 0.5)
    assert [one.after(False) for _ in range(5)] == [RECONNECT_FIRST_S, 1.0, 2.0, 4.0, 4.0]
    assert one.after(True) == RECONNECT_FIRST_S  # a session that served: the next outage starts afresh
    three = Backoff(4.0, rand=lambda: 0.5, nodes=3)
    # lost after serving: connect() moves on to the next node at once
    assert three.after(True) == 0.0
    # every node failed in a row (connect raised): back off
    assert [three.after(False) for _ in range(3)] == [RECONNECT_FIRST_S, 1.0, 2.0]
