"""Micro-benchmarks of the worker's pure hot paths (pytest-benchmark).

    .venv/bin/pytest bench/micro --benchmark-only

Each delivery is decoded once, added to the work queue, handed out, finished; each
failure computes a delay and a tier hop; each membership change recomputes the
assignment. The decode/encode groups compare msgspec (what pool.codec uses) with orjson
and the standard library on a typical ~150-byte event, so the choice rests on numbers.
Every benchmark also checks its result, so a broken hot path fails instead of timing.
"""

from __future__ import annotations

import itertools
import json
import random

import msgspec
import orjson
import pytest

from pool import codec
from pool.assignment import Member, assign
from pool.retries import DEFAULT_TIERS_S, RetryPolicy, next_hop
from pool.workqueue import WorkQueue


class DeploymentEvent(msgspec.Struct):
    name: str
    namespace: str
    replicas: int
    image: str
    generation: int
    labels: dict[str, str]


EVENT = {
    "name": "web-frontend-042",
    "namespace": "prod",
    "replicas": 3,
    "image": "registry.example.com/web:1.24.3",
    "generation": 17,
    "labels": {"team": "payments"},
}
BODY = orjson.dumps(EVENT)  # compact JSON, what any publisher sends
STRUCT = DeploymentEvent(**EVENT)


def test_body_is_typical_size() -> None:
    # Given the benchmark body
    # When measured
    # Then it is the ~150-byte event the numbers claim to be about
    assert 130 <= len(BODY) <= 170


# ---- decode: bytes -> event ----

@pytest.mark.benchmark(group="decode")
def test_decode_msgspec_struct(benchmark) -> None:  # noqa: ANN001
    # Given the production decoder for a Struct event
    decode = codec.make_decoder(DeploymentEvent)
    # When the body is decoded (and validated) repeatedly
    event = benchmark(decode, BODY)
    # Then it yields the typed event
    assert event == STRUCT


@pytest.mark.benchmark(group="decode")
def test_decode_msgspec_untyped(benchmark) -> None:  # noqa: ANN001
    # Given the production decoder without an event type
    decode = codec.make_decoder(None)
    # When the body is decoded repeatedly
    event = benchmark(decode, BODY)
    # Then it yields plain JSON values
    assert event == EVENT


@pytest.mark.benchmark(group="decode")
def test_decode_orjson(benchmark) -> None:  # noqa: ANN001
    # Given orjson, the alternative the owner named
    # When the body is decoded repeatedly
    event = benchmark(orjson.loads, BODY)
    # Then it yields plain JSON values (no validation)
    assert event == EVENT


@pytest.mark.benchmark(group="decode")
def test_decode_stdlib_json(benchmark) -> None:  # noqa: ANN001
    # Given the standard library, the baseline
    # When the body is decoded repeatedly
    event = benchmark(json.loads, BODY)
    # Then it yields plain JSON values (no validation)
    assert event == EVENT


# ---- encode: event -> bytes ----

@pytest.mark.benchmark(group="encode")
def test_encode_msgspec_struct(benchmark) -> None:  # noqa: ANN001
    # Given a Struct event
    # When the production encoder serializes it repeatedly
    body = benchmark(codec.encode, STRUCT)
    # Then it is the compact JSON body
    assert body == BODY


@pytest.mark.benchmark(group="encode")
def test_encode_msgspec_dict(benchmark) -> None:  # noqa: ANN001
    # Given a dict event
    # When the production encoder serializes it repeatedly
    body = benchmark(codec.encode, EVENT)
    # Then it is the compact JSON body
    assert body == BODY


@pytest.mark.benchmark(group="encode")
def test_encode_orjson(benchmark) -> None:  # noqa: ANN001
    # Given a dict event
    # When orjson serializes it repeatedly
    body = benchmark(orjson.dumps, EVENT)
    # Then it is the compact JSON body
    assert body == BODY


@pytest.mark.benchmark(group="encode")
def test_encode_stdlib_json(benchmark) -> None:  # noqa: ANN001
    # Given the standard library producing the same compact bytes
    def dumps(obj: object) -> bytes:
        return json.dumps(obj, separators=(",", ":")).encode()

    # When it serializes the dict event repeatedly
    body = benchmark(dumps, EVENT)
    # Then it is the compact JSON body
    assert body == BODY


# ---- work queue ----

@pytest.mark.benchmark(group="workqueue")
def test_workqueue_cycle_distinct_keys(benchmark) -> None:  # noqa: ANN001
    # Given an empty queue and keys that are never in it when added
    q: WorkQueue[str, int] = WorkQueue()
    keys = itertools.cycle([f"deployment-{i}" for i in range(1024)])

    def cycle() -> None:
        q.add(next(keys), 1)
        key, items = q.get()  # type: ignore[misc]
        q.done(key, len(items))

    # When each cycle adds a delivery, hands it out and finishes it
    benchmark(cycle)
    # Then nothing is left behind and nothing coalesced
    s = q.statistics()
    assert (s.ready, s.processing, s.items, s.coalesced) == (0, 0, 0, 0)
    assert s.adds > 0


@pytest.mark.benchmark(group="workqueue")
def test_workqueue_cycle_hot_key_coalescing(benchmark) -> None:  # noqa: ANN001
    # Given one hot key that is always being processed
    q: WorkQueue[str, int] = WorkQueue()
    q.add("hot", 0)
    handed = [len(q.get()[1])]  # type: ignore[index]

    def cycle() -> None:
        q.add("hot", 1)
        q.done("hot", handed[0])
        handed[0] = len(q.get()[1])  # type: ignore[index]

    # When each cycle adds a delivery for it (collapsing into the follow-up),
    # finishes the reconcile and hands out the follow-up
    benchmark(cycle)
    # Then every add after the first coalesced, and only the handed-out item is held
    s = q.statistics()
    assert (s.processing, s.ready, s.items) == (1, 0, 1)
    assert s.coalesced == s.adds - 1


# ---- assignment ----

@pytest.mark.benchmark(group="assignment")
def test_assign_64_partitions_8_members(benchmark) -> None:  # noqa: ANN001
    # Given 8 workers on 4 hosts
    members = [Member(f"host{i // 2}/{i % 2}") for i in range(8)]
    # When 64 partitions are assigned repeatedly (each membership change does it once per controller)
    owners = benchmark(assign, members, "deployments", 64)
    # Then each worker owns 8
    assert sorted(owners.count(m.id) for m in members) == [8] * 8


# ---- retries ----

@pytest.mark.benchmark(group="retries")
def test_retry_delay_and_first_hop(benchmark) -> None:  # noqa: ANN001
    # Given the default policy and seeded randomness
    policy = RetryPolicy()
    rng = random.Random(7)

    def plan() -> tuple[float | None, float]:
        return next_hop(policy.delay_s(5, rng.random), DEFAULT_TIERS_S)

    # When the delay after failure 5 and its first tier hop are computed repeatedly
    tier, remaining = benchmark(plan)
    # Then the hop is a real tier and the remainder is not negative
    assert tier in DEFAULT_TIERS_S and remaining >= 0
