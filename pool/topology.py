"""Per-controller exchanges and queues on the broker: names, idempotent declaration, checks.

Data flow: ``Names`` derives every name from (prefix, controller). ``ensure`` opens a
throwaway connection (a missing consistent-hash plugin closes the whole connection on
RabbitMQ 3.10, DESIGN fact 7), refuses a topology that differs from the settings
(``TopologyMismatch``), then declares what is missing. Partition bindings are made once,
in index order, weight "1", and never removed (DESIGN: fixed partitions).

    publisher --(routing key = item key)--> ctl.C  [x-consistent-hash]
        --> ctl.C.p000 .. ctl.C.p{P-1}   partition queues, one consumer each
    worker --(retry / requeue_after)--> ctl.C.delay.<tier>  [fanout exchange + TTL queue]
        --(expires, dead-lettered with the item key)--> ctl.C
    worker --(poison)--> ctl.C.parked        (also the broker's dead-letter target
                                              when a quorum partition hits its delivery limit)
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from typing import Any

from .amqp import ChannelGone, Connection, connect, plugin_error_or
from .errors import PluginMissing, TopologyMismatch
from .retries import tier_name
from .settings import BrokerSettings, TopologySettings

# Broker-side backstop for quorum partitions: the worker parks a message after
# ``max_deliveries`` (default 3); the broker dead-letters to parking after this many, in
# case a message kills workers before they can look at it. Fixed, because queue
# arguments cannot change once declared.
BROKER_DELIVERY_LIMIT = 20
NOT_FOUND = 404
PRECONDITION_FAILED = 406


@dataclass(frozen=True)
class Names:
    prefix: str
    controller: str

    @property
    def exchange(self) -> str:
        return f"{self.prefix}.{self.controller}"

    def partition(self, p: int, partitions: int) -> str:
        width = max(3, len(str(partitions - 1)))
        return f"{self.exchange}.p{p:0{width}d}"

    def clean_marker(self, p: int, partitions: int) -> str:
        """A transient exchange saying: this partition holds nothing routed by an earlier ring.

        Transient (non-durable) exchanges vanish when the broker restarts, exactly when the
        consistent-hash ring is rebuilt (DESIGN fact 1), so the marker lives as long as the
        ring that every message in the partition was routed by."""
        return f"{self.partition(p, partitions)}.clean"

    def tier(self, tier_s: float) -> str:
        """Both the fanout exchange and the TTL queue of a delay tier."""
        return f"{self.exchange}.delay.{tier_name(tier_s)}"

    @property
    def parked(self) -> str:
        return f"{self.exchange}.parked"


def members_exchange(prefix: str) -> str:
    return f"{prefix}.members"


def _quorum_safety() -> dict[str, Any]:
    # at-least-once dead-lettering (DESIGN fact 4) needs reject-publish overflow
    return {"x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"}


def partition_args(names: Names, topo: TopologySettings) -> dict[str, Any]:
    if topo.queue_type == "classic":
        return {"x-queue-type": "classic"}
    return {
        "x-queue-type": "quorum",
        "x-single-active-consumer": True,  # the broker's lock: one active consumer per partition
        "x-delivery-limit": BROKER_DELIVERY_LIMIT,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": names.parked,
        **_quorum_safety(),
    }


def tier_args(names: Names, topo: TopologySettings, tier_s: int) -> dict[str, Any]:
    args: dict[str, Any] = {
        "x-queue-type": topo.queue_type,
        "x-message-ttl": int(tier_s * 1000),
        "x-dead-letter-exchange": names.exchange,  # no routing key: the item key routes it back
    }
    if topo.queue_type == "quorum":
        args.update(_quorum_safety())
    return args


def _mismatch(names: Names, queue: str, exc: ChannelGone, topo: TopologySettings) -> TopologyMismatch:
    return TopologyMismatch(
        f"queue {queue} exists with other arguments than --queue-type {topo.queue_type} "
        f"--partitions {topo.partitions} give ({exc.reply_text}); delete the controller's queues "
        f"or use the settings it was created with"
    )


async def _partition_mismatch(conn: Connection, names: Names, queue: str, exc: ChannelGone,
                              topo: TopologySettings) -> TopologyMismatch:
    """Name what differs: a partition that declares cleanly as the other queue type is one."""
    other = "classic" if topo.queue_type == "quorum" else "quorum"
    ch = await conn.channel()
    try:
        # declaring a queue exactly as it exists changes nothing
        await ch.rpc("queue_declare", queue=queue, durable=True,
                     arguments=partition_args(names, replace(topo, queue_type=other)))
    except ChannelGone:
        return _mismatch(names, queue, exc, topo)
    await ch.close()
    return TopologyMismatch(
        f"controller {names.controller!r} exists on the broker with {other} queues ({queue}), "
        f"not --queue-type {topo.queue_type}; use --queue-type {other}, or delete exchange "
        f"{names.exchange} and its queues to start over")


async def _exists(conn: Connection, kind: str, name: str) -> bool:
    ch = await conn.channel()
    try:
        await ch.rpc(f"{kind}_declare", **{kind: name}, passive=True)
        return True
    except ChannelGone as exc:
        if exc.reply_code == NOT_FOUND:
            return False
        raise
    finally:
        await ch.close()


async def declare_controller(conn: Connection, prefix: str, controller: str, topo: TopologySettings) -> None:
    """Check then declare one controller's topology on an open connection."""
    names = Names(prefix, controller)
    p = topo.partitions
    fresh = not await _exists(conn, "exchange", names.exchange)
    if not fresh:
        have_last = await _exists(conn, "queue", names.partition(p - 1, p))
        have_more = await _exists(conn, "queue", names.partition(p, p + 1))
        if not have_last or have_more:
            raise TopologyMismatch(
                f"controller {controller!r} already has a different number of partitions on the broker than "
                f"--partitions {p}; changing it would re-route keys. Use the original count, or delete "
                f"exchange {names.exchange} and its queues to start over"
            )
    ch = await conn.channel()
    try:
        await ch.rpc("exchange_declare", exchange=names.exchange, exchange_type="x-consistent-hash", durable=True)
    except ChannelGone as exc:
        raise plugin_error_or(exc) from None
    try:
        for i in range(p):
            q = names.partition(i, p)
            # a queue created now holds nothing from an earlier ring (one left behind by a deleted
            # exchange may: it gets no marker, so its first owner re-routes what it holds)
            new_queue = fresh and not await _exists(conn, "queue", q)
            try:
                await ch.rpc("queue_declare", queue=q, durable=True, arguments=partition_args(names, topo))
            except ChannelGone as exc:
                if exc.reply_code == PRECONDITION_FAILED:
                    raise await _partition_mismatch(conn, names, q, exc, topo) from None
                raise
            await ch.rpc("queue_bind", queue=q, exchange=names.exchange, routing_key="1")
            if new_queue:
                await declare_clean_marker(ch, names.clean_marker(i, p))
        for t in topo.tiers_s:
            name = names.tier(t)
            await ch.rpc("exchange_declare", exchange=name, exchange_type="fanout", durable=True)
            try:
                await ch.rpc("queue_declare", queue=name, durable=True, arguments=tier_args(names, topo, t))
            except ChannelGone as exc:
                if exc.reply_code == PRECONDITION_FAILED:
                    raise _mismatch(names, name, exc, topo) from None
                raise
            await ch.rpc("queue_bind", queue=name, exchange=name, routing_key="")
        parked_args = {"x-queue-type": topo.queue_type}
        try:
            await ch.rpc("queue_declare", queue=names.parked, durable=True, arguments=parked_args)
        except ChannelGone as exc:
            if exc.reply_code == PRECONDITION_FAILED:
                raise _mismatch(names, names.parked, exc, topo) from None
            raise
        await ch.rpc("exchange_declare", exchange=members_exchange(prefix), exchange_type="fanout", durable=True)
    finally:
        await ch.close()


async def declare_clean_marker(ch: Any, name: str) -> None:
    await ch.rpc("exchange_declare", exchange=name, exchange_type="fanout", durable=False, auto_delete=False)


async def is_clean(conn: Connection, names: Names, p: int, partitions: int) -> bool:
    """Whether partition ``p`` has been cleared of earlier-ring messages since the broker started."""
    return await _exists(conn, "exchange", names.clean_marker(p, partitions))


async def ensure(broker: BrokerSettings, topo: TopologySettings, controllers: list[str]) -> None:
    """Declare every controller's topology on a throwaway connection (see module docstring)."""
    conn = await connect(broker.amqp_url, name="ctlpool-topology", heartbeat_s=broker.heartbeat_s)
    try:
        for c in controllers:
            try:
                await declare_controller(conn, broker.prefix, c, topo)
            except ChannelGone as exc:
                raise plugin_error_or(exc) from None
    except ChannelGone as exc:  # pragma: no cover - connection dropped mid-way
        raise plugin_error_or(exc) from None
    finally:
        conn.close()
        await asyncio.sleep(0)


@dataclass(frozen=True)
class QueueCount:
    name: str
    ready: int
    consumers: int


async def counts(conn: Connection, queues: list[str]) -> list[QueueCount | None]:
    """Ready messages and consumers of each queue (``None`` where it does not exist)."""
    out: list[QueueCount | None] = []
    for q in queues:
        ch = await conn.channel()
        try:
            ok = await ch.rpc("queue_declare", queue=q, passive=True)
            out.append(QueueCount(q, ok.method.message_count, ok.method.consumer_count))
        except ChannelGone as exc:
            if exc.reply_code != NOT_FOUND:
                raise
            out.append(None)
        finally:
            await ch.close()
    return out


__all__ = ["Names", "ensure", "declare_controller", "counts", "QueueCount", "members_exchange",
           "partition_args", "tier_args", "PluginMissing"]
