"""Per-controller exchanges and queues on the broker: names, idempotent declaration, checks.

Data flow: ``Names`` derives every name from (prefix, controller). ``ensure`` opens a
throwaway connection (a missing consistent-hash plugin closes the whole connection on
RabbitMQ 3.10, DESIGN fact 7), looks at what exists (``survey``), refuses a topology that
differs from the settings (``refusal``, raised as ``TopologyMismatch``), then declares what is
missing. Partition bindings are made once, in index order, weight "1", and never removed
(DESIGN: fixed partitions).

The declaration order is also what an interrupted declaration leaves behind: the exchange;
each partition's queue then its binding, in index order; the delay tiers; the parking queue
last. AMQP cannot list bindings, so the survey reads them off that order with passive
declares: the partition queues are p000..p(k-1), all bound but perhaps the last, and the
parking queue exists once a declaration has bound every partition. Fewer partitions than
configured and no parking queue is a first declaration that was cut short (a killed
``ctlpool run``) or is still running (two pools starting at once): this one completes it, binding
the rest in index order (binding an existing binding changes nothing), so the ring ends as a
fresh one would (the plugin numbers buckets in binding order, DESIGN fact 1). Fewer partitions
with a parking queue, any beyond the count, or a gap is another topology: refused, naming how
many messages its queues hold, never advising to delete them before those are moved.

    publisher --(routing key = item key)--> ctl.C  [x-consistent-hash]
        --> ctl.C.p000 .. ctl.C.p{P-1}   partition queues, one consumer each
    worker --(retry / requeue_after)--> ctl.C.delay.<tier>  [fanout exchange + TTL queue]
        --(expires, dead-lettered with the item key)--> ctl.C
    worker --(poison)--> ctl.C.parked        (also the broker's dead-letter target
                                              when a quorum partition hits its delivery limit)
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, replace
from typing import Any, Callable

from . import budget
from . import layout as layouts
from .amqp import NOT_FOUND, ChannelGone, Connection, connect, plugin_error_or
from .errors import BrokerUnavailable, PluginMissing, TopologyMismatch
from .names import NAME_WIDTHS, Names, members_exchange, name_width
from .settings import BrokerSettings, TopologySettings
from .layout import Layout
from .replicas import Unavailable
from .urls import split_urls

log = logging.getLogger("ctlpool.topology")

# Broker-side backstop for quorum partitions: the worker parks a message after
# ``max_deliveries`` (default 3); the broker dead-letters to parking after this many, in
# case a message kills workers before they can look at it. Fixed, because queue
# arguments cannot change once declared.
BROKER_DELIVERY_LIMIT = 20
PRECONDITION_FAILED = 406


def _quorum_safety() -> dict[str, Any]:
    # at-least-once dead-lettering (DESIGN fact 4) needs reject-publish overflow
    return {"x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"}


def _replicas(topo: TopologySettings) -> dict[str, Any]:
    if topo.queue_type != "quorum" or not topo.replicas:
        return {}  # the broker's default group size
    return {"x-quorum-initial-group-size": topo.replicas}


def layout_args(topo: TopologySettings) -> dict[str, Any]:
    """The layout queue's (``pool.layout``): replicated like the rest, so it outlives a node."""
    return {"x-queue-type": topo.queue_type, **_replicas(topo)}


def partition_args(names: Names, topo: TopologySettings) -> dict[str, Any]:
    if topo.queue_type == "classic":
        return {"x-queue-type": "classic"}
    return {
        **_replicas(topo),
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
        args.update(_replicas(topo))
    return args


async def _run_length(conn: Connection, name_of: Callable[[int], str], start: int) -> int:
    """How many queues ``name_of(start)``, ``name_of(start + 1)``, ... exist before the first missing one."""
    n = 0
    while await conn.exists("queue", name_of(start + n)):
        n += 1
    return n


@dataclass(frozen=True)
class Survey:
    """A controller's partitions on the broker, as passive declares see them (see module docstring)."""

    exchange: bool
    """The controller's consistent-hash exchange exists."""
    present: tuple[int, ...]
    """Indices below the configured count whose partition queue exists."""
    beyond: int
    """Partition queues from the configured count on (p{P}, p{P+1}, ...) that exist."""
    other_width: tuple[int, int] | None
    """Only when none of ``present`` exists: (digits, how many) of partition queues named for a
    count of another name width."""
    completed: bool
    """The parking queue exists: a declaration bound every partition it was given."""


async def survey(conn: Connection, names: Names, partitions: int) -> Survey:
    """What exists of a controller's topology, read without changing anything.

    Another declaration may be adding partitions meanwhile (in index order), so the order of
    the looks matters: the parking queue before the partitions (else a declaration finishing
    in between would look complete with fewer partitions), and the partitions from the last
    down (else one growing in between would look like a gap)."""
    p = partitions
    exchange = await conn.exists("exchange", names.exchange)
    completed = await conn.exists("queue", names.parked)
    present = [i for i in reversed(range(p)) if await conn.exists("queue", names.partition(i, p))]
    other: tuple[int, int] | None = None
    for width in NAME_WIDTHS if not present else ():
        n = 0 if width == name_width(p) else await _run_length(
            conn, lambda i, w=width: names.partition_of_width(i, w), 0)
        if n:
            other = (width, n)
            break
    beyond = await _run_length(conn, lambda i: names.partition(i, p), p)
    return Survey(exchange, tuple(sorted(present)), beyond, other, completed)


def refusal(found: Survey, names: Names, partitions: int) -> str | None:
    """Why the partitions found can't serve ``partitions``; ``None`` when they can, once completed.

    Without the exchange there is no ring yet, so nothing is refused (leftover queues are bound
    in index order); without partition queues the ring is empty (bindings go with their queues).
    An unfinished declaration is completed whatever count it was given, as long as it made no
    more queues than this one will: no ring it built was ever complete."""
    if not found.exchange:
        return None
    p, k, c = partitions, len(found.present), names.controller
    if found.other_width is not None:
        width, n = found.other_width
        return (f"controller {c!r} already has a different number of partitions on the broker ({n}, named "
                f"like {names.partition_of_width(0, width)}) than --partitions {p}; changing it would re-route "
                f"keys. Use --partitions {n}")
    gap = found.present != tuple(range(k))
    if gap and not found.completed:
        missing = names.partition(next(i for i in range(p) if i not in found.present), p)
        return (f"controller {c!r} lacks partition queue {missing} on the broker while later partitions exist; "
                f"declaring it again would bind it last on the hash ring and re-route keys")
    if found.beyond and not found.completed:
        return (f"controller {c!r} already has a different number of partitions on the broker (at least "
                f"{k + found.beyond}, from a declaration that did not finish) than --partitions {p}; changing it "
                f"would re-route keys. Use the count it was first declared with")
    # A complete topology with a queue missing between others lost it later (deleted by hand):
    # it is declared again, as before; its worker re-routes what it receives (ring-drift guard).
    if found.beyond or (found.completed and 0 < k < p and not gap):
        return (f"controller {c!r} already has a different number of partitions on the broker "
                f"({k + found.beyond}) than --partitions {p}; changing it would re-route keys. "
                f"Use --partitions {k + found.beyond}")
    return None


async def _start_over(conn: Connection, names: Names, topo: TopologySettings, found: Survey) -> str:
    """How to start over without losing events: what the controller's queues hold comes first."""
    p = topo.partitions
    queues = [names.partition(i, p) for i in found.present]
    queues += [names.partition(p + i, p) for i in range(found.beyond)]
    if found.other_width is not None:
        width, n = found.other_width
        queues += [names.partition_of_width(i, width) for i in range(n)]
    queues += [names.tier(t) for t in topo.tiers_s] + [names.parked]
    held = [q for q in await counts(conn, queues) if q is not None]
    ready = sum(q.ready for q in held)
    consumers = sum(q.consumers for q in held)
    drop = f"delete exchange {names.exchange} and its queues"
    if not ready and not consumers:
        return f"; its {len(held)} queues hold no messages, so to start over {drop}"
    unacked = f"; their {consumers} consumers may hold more, unacked: stop them first" if consumers else ""
    return (f"; to start over, first move or drain the {ready} message{'' if ready == 1 else 's'} its {len(held)} "
            f"queues hold (e.g. with a shovel{unacked}), then {drop}")


async def _mismatch(conn: Connection, names: Names, queue: str, exc: ChannelGone, topo: TopologySettings,
                    found: Survey) -> TopologyMismatch:
    return TopologyMismatch(
        f"queue {queue} exists with other arguments than --queue-type {topo.queue_type} "
        f"--partitions {topo.partitions} --queue-replicas {topo.replicas} give ({exc.reply_text}); use the settings it was created with"
        + await _start_over(conn, names, topo, found))


async def _partition_mismatch(conn: Connection, names: Names, queue: str, exc: ChannelGone,
                              topo: TopologySettings, found: Survey) -> TopologyMismatch:
    """Name what differs: a partition that declares cleanly as the other queue type is one."""
    other = "classic" if topo.queue_type == "quorum" else "quorum"
    ch = await conn.channel()
    try:
        # declaring a queue exactly as it exists changes nothing
        await ch.rpc("queue_declare", queue=queue, durable=True,
                     arguments=partition_args(names, replace(topo, queue_type=other)))
    except ChannelGone:
        return await _mismatch(conn, names, queue, exc, topo, found)
    await ch.close()
    return TopologyMismatch(
        f"controller {names.controller!r} exists on the broker with {other} queues ({queue}), "
        f"not --queue-type {topo.queue_type}; use --queue-type {other}" + await _start_over(conn, names, topo, found))


def live_count(found: Survey) -> int | None:
    """The partition count of a complete topology (declared before layouts existed), if it is one."""
    k = len(found.present)
    if found.completed and found.other_width is None and k and found.present == tuple(range(k)):
        return k + found.beyond
    return None


async def declare_controller(conn: Connection, prefix: str, controller: str, topo: TopologySettings,
                             place: list[Connection] | None = None) -> Layout:
    """Check then declare one controller's topology on an open connection (see module docstring);
    returns its live layout (``pool.layout``), which wins over ``topo.partitions`` once it exists.

    ``place``: one connection per node of a cluster. A quorum queue's leader starts on the node
    its declaration came through (the broker's default, client-local), so each queue that does not
    exist yet is declared through the next of them in turn: leaders spread evenly over the nodes."""
    names = Names(prefix, controller)
    live = await layouts.read(conn, names)
    if live is not None:
        if live.resize is not None:
            return live  # a resize owns the partitions and their bindings until it is done
        topo = replace(topo, partitions=live.partitions)
    found = await survey(conn, names, topo.partitions)
    count = live_count(found) if live is None else None
    if count is not None and count != topo.partitions:  # declared before layouts: its count is the live one
        topo = replace(topo, partitions=count)
        found = await survey(conn, names, count)
    await _declare(conn, names, topo, found, place)
    if live is None:
        live = await layouts.write(conn, names, layouts.Layout(controller, topo.partitions), layout_args(topo))
    return live


async def _declare(conn: Connection, names: Names, topo: TopologySettings, found: Survey,
                   place: list[Connection] | None) -> None:
    p = topo.partitions
    problem = refusal(found, names, p)
    if problem is not None:
        raise TopologyMismatch(problem + await _start_over(conn, names, topo, found))
    # A new exchange or an unfinished declaration gets bindings now: the ring changes under what
    # the existing partitions hold, so none of them may stay marked clean
    binding = not (found.exchange and found.completed and len(found.present) == p)
    ch = await conn.channel()
    placers = [await c.channel() for c in place or ()]
    turn = iter(range(1 << 30))

    def via(exists: bool) -> Any:  # the channel a queue is declared on
        return ch if exists or not placers else placers[next(turn) % len(placers)]
    try:
        for i in found.present if binding else ():
            await ch.rpc("exchange_delete", exchange=names.clean_marker(i, p))  # deleting a missing one is ok
        await ch.rpc("exchange_declare", exchange=names.exchange, exchange_type="x-consistent-hash", durable=True)
    except ChannelGone as exc:
        raise plugin_error_or(exc) from None
    try:
        for i in range(p):
            q = names.partition(i, p)
            try:
                await via(i in found.present).rpc("queue_declare", queue=q, durable=True,
                                                  arguments=partition_args(names, topo))
            except ChannelGone as exc:
                if exc.reply_code == PRECONDITION_FAILED:
                    raise await _partition_mismatch(conn, names, q, exc, topo, found) from None
                raise
            await ch.rpc("queue_bind", queue=q, exchange=names.exchange, routing_key="1")
        if binding:
            await _mark_new_partitions(conn, ch, names, p, found)
        for t in topo.tiers_s:
            name = names.tier(t)
            await ch.rpc("exchange_declare", exchange=name, exchange_type="fanout", durable=True)
            try:
                await via(False).rpc("queue_declare", queue=name, durable=True, arguments=tier_args(names, topo, t))
            except ChannelGone as exc:
                if exc.reply_code == PRECONDITION_FAILED and "invalid arg" in exc.reply_text:
                    raise TopologyMismatch(f"the broker refused delay tier {name} (--tiers-s {t}): "
                                           f"{exc.reply_text}") from None
                if exc.reply_code == PRECONDITION_FAILED:
                    raise await _mismatch(conn, names, name, exc, topo, found) from None
                raise
            await ch.rpc("queue_bind", queue=name, exchange=name, routing_key="")
        parked_args = {"x-queue-type": topo.queue_type, **_replicas(topo)}
        try:
            # last: its existence says every partition is bound (see module docstring)
            await via(False).rpc("queue_declare", queue=names.parked, durable=True, arguments=parked_args)
        except ChannelGone as exc:
            if exc.reply_code == PRECONDITION_FAILED:
                raise await _mismatch(conn, names, names.parked, exc, topo, found) from None
            raise
        await ch.rpc("exchange_declare", exchange=members_exchange(names.prefix), exchange_type="fanout",
                     durable=True)
    finally:
        for c in (ch, *placers):
            await c.close()


async def _mark_new_partitions(conn: Connection, ch: Any, names: Names, partitions: int, found: Survey) -> None:
    """Mark clean the partitions created by this declaration that are still empty.

    Only now, with every binding made, is the ring final: a queue created now that got events
    meanwhile (publishers don't wait for the pool, a concurrent declaration binds too) holds
    some routed by a smaller ring, so it stays unmarked and its first owner re-routes them. A
    queue left behind by a deleted exchange is never marked: it may hold events of that ring."""
    created = [i for i in range(partitions) if i not in found.present]
    for i, q in zip(created, await counts(conn, [names.partition(i, partitions) for i in created])):
        if q is not None and not q.ready and not q.consumers:
            await declare_clean_marker(ch, names.clean_marker(i, partitions))


async def declare_clean_marker(ch: Any, name: str) -> None:
    await ch.rpc("exchange_declare", exchange=name, exchange_type="fanout", durable=False, auto_delete=False)


async def is_clean(conn: Connection, names: Names, p: int, partitions: int) -> bool:
    """Whether partition ``p`` has been cleared of earlier-ring messages since the broker started."""
    return await conn.exists("exchange", names.clean_marker(p, partitions))


async def ensure(broker: BrokerSettings, topo: TopologySettings, controllers: list[str]) -> dict[str, Layout]:
    """Declare every controller's topology on a throwaway connection (see module docstring);
    returns each one's live layout. A live count other than ``topo.partitions`` is followed, and
    said once (``--partitions`` is what a *new* controller is declared with)."""
    conn = await connect(broker.amqp_url, name="ctlpool-topology", heartbeat_s=broker.heartbeat_s)
    place = await node_connections(broker)
    out: dict[str, Layout] = {}
    try:
        await _check_budget(conn, broker, topo, controllers)
        for c in controllers:
            try:
                live = out[c] = await declare_controller(conn, broker.prefix, c, topo, place)
            except ChannelGone as exc:
                raise plugin_error_or(exc) from None
            if live.partitions != topo.partitions:
                log.info("controller %s has %s on the broker; following it (--partitions %d is what a new "
                         "controller is declared with; to change this one: ctlpool topology resize %s "
                         "--partitions %d)", c, live.describe(), topo.partitions, c, topo.partitions)
    except ChannelGone as exc:  # pragma: no cover - connection dropped mid-way
        raise plugin_error_or(exc) from None
    finally:
        for c in (conn, *place):
            c.close()
        await asyncio.sleep(0)
    return out


QUEUES_BESIDE_PARTITIONS = 2  # the parking queue and the layout queue (the delay tiers are counted apart)


async def _check_budget(conn: Connection, broker: BrokerSettings, topo: TopologySettings, controllers: list[str]) -> None:
    """Refuse to declare new controllers whose queues the broker has no file handles for (``pool.budget``)."""
    new = [c for c in controllers if not await conn.exists("exchange", Names(broker.prefix, c).exchange)]
    if not new:
        return
    queues = len(new) * (topo.partitions + len(topo.tiers_s) + QUEUES_BESIDE_PARTITIONS)
    try:
        room = await asyncio.to_thread(budget.read, broker.admin_node, broker.amqp_url)
    except Unavailable as exc:
        log.debug("the broker's file handles can't be read here: %s", exc)
        return
    problem = room.refusal(queues)
    if problem:
        raise TopologyMismatch(f"declaring {', '.join(new)} ({queues} queues): {problem}")


async def node_connections(broker: BrokerSettings) -> list[Connection]:
    """A connection to each node of a URL list that answers (none for a single URL)."""
    nodes = [u.strip() for u in split_urls(broker.amqp_url)]
    out = []
    for url in nodes if len(nodes) > 1 else ():
        try:
            out.append(await connect(url, name="ctlpool-topology placement", heartbeat_s=broker.heartbeat_s))
        except BrokerUnavailable:
            pass  # its share goes to the others
    return out


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


__all__ = ["Names", "ensure", "declare_controller", "survey", "Survey", "refusal", "counts", "QueueCount",
           "members_exchange", "partition_args", "tier_args", "PluginMissing"]
