"""The bench's own broker chores: unique prefixes, declaring and deleting a topology, queue depths.

Every measured phase gets a fresh prefix (``b<hex>``) so nothing left by an earlier run,
or by the other side of a pool/floor pair, can feed it. The topology is declared with the
pool's own ``pool.topology.ensure`` (the floor consumes exactly the queues the pool would)
and deleted by name afterwards: every name under a prefix is derivable from
``pool.topology.Names``, so no management API or ``rabbitmqctl`` is needed (a benchmark
host may have neither).
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from dataclasses import dataclass

import pika
import pika.exceptions

from pool.settings import BrokerSettings, TopologySettings
from pool.topology import Names, ensure, members_exchange
from pool.urls import split_urls

from .controllers import NAME


@dataclass(frozen=True)
class Target:
    """Where a phase's events go: broker, prefix and queue layout."""

    url: str
    prefix: str
    partitions: int
    queue_type: str

    @property
    def names(self) -> Names:
        return Names(self.prefix, NAME)

    @property
    def topology(self) -> TopologySettings:
        return TopologySettings(partitions=self.partitions, queue_type=self.queue_type)

    @property
    def partition_queues(self) -> list[str]:
        return [self.names.partition(i, self.partitions) for i in range(self.partitions)]


def unique_prefix() -> str:
    return f"b{uuid.uuid4().hex[:10]}"


def _blocking(url: str) -> pika.BlockingConnection:
    """A blocking connection to the first node of ``url`` (one URL or a cluster's list) that answers."""
    nodes = [u.strip() for u in split_urls(url)]
    for node in nodes[:-1]:
        try:
            return pika.BlockingConnection(pika.URLParameters(node))
        except pika.exceptions.AMQPConnectionError:
            pass
    return pika.BlockingConnection(pika.URLParameters(nodes[-1]))


def declare(t: Target) -> None:
    """Declare the bench controller's topology under ``t.prefix`` (idempotent)."""
    asyncio.run(ensure(BrokerSettings(amqp_url=t.url, prefix=t.prefix), t.topology, [NAME]))


def clean_markers(t: Target) -> list[str]:
    return [t.names.clean_marker(i, t.topology.partitions) for i in range(t.topology.partitions)]


def forget_clean(t: Target) -> None:
    """Delete the partitions' clean markers, as a broker restart does: the pool's ring-drift guard
    then re-routes whatever backlog it finds when it acquires them."""
    conn = _blocking(t.url)
    try:
        ch = conn.channel()
        for e in clean_markers(t):
            ch.exchange_delete(e)
    finally:
        if conn.is_open:
            conn.close()


RESIZED_UP_TO = 64  # bench resize grows a target to this many partitions: delete what it may have left


def delete(t: Target) -> None:
    """Delete every queue and exchange the pool declares under ``t.prefix`` (a resize's too)."""
    n = t.names
    most = max(t.partitions, RESIZED_UP_TO)
    partitions = [n.partition(i, most) for i in range(most)]
    queues = partitions + [n.tier(s) for s in t.topology.tiers_s] + [n.parked, n.layout]
    exchanges = [n.exchange, members_exchange(t.prefix)] + [n.tier(s) for s in t.topology.tiers_s]
    exchanges += [f"{q}.clean" for q in partitions]
    conn = _blocking(t.url)
    try:
        ch = conn.channel()
        for q in queues:
            ch.queue_delete(q)  # deleting a missing queue is not an error
        for e in exchanges:
            ch.exchange_delete(e)
    finally:
        if conn.is_open:
            conn.close()


def delete_or_warn(t: Target) -> None:
    """``delete``, or say on stderr what is left behind (a full broker refuses connections: DESIGN notes)."""
    try:
        delete(t)
    except Exception as exc:  # noqa: BLE001 - cleanup must not hide the run's own outcome
        print(f"bench: could not delete the queues under prefix {t.prefix!r} ({exc!r}); delete them with: "
              f"rabbitmqctl list_queues name | grep '^{t.prefix}\\.' | xargs -n1 rabbitmqctl delete_queue",
              file=sys.stderr)


def depths(url: str, queues: list[str]) -> dict[str, int]:
    """Ready messages per queue (missing queues count 0)."""
    conn = _blocking(url)
    out: dict[str, int] = {}
    try:
        for q in queues:
            ch = conn.channel()
            try:
                out[q] = ch.queue_declare(q, passive=True).method.message_count
                ch.close()
            except pika.exceptions.ChannelClosedByBroker:
                out[q] = 0
    finally:
        if conn.is_open:
            conn.close()
    return out
