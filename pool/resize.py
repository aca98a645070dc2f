"""``ctlpool topology resize C --partitions N``: grow or shrink a controller's partitions online.

Why it is safe: a key is reconciled only by the owner of the partition the consistent-hash ring
routes it to, and a ring change moves keys between partitions. So, as on a broker restart
(DESIGN G1), nothing routed by the old ring may be reconciled once anything is reconciled
under the new one, and no reconcile may still run that began under the old one.

Data flow, one step at a time; each step is written to the controller's layout on the broker
(``pool.layout``) before the next begins and announced to every member (a notice on the members
exchange), so any process can finish what another started, and doing a step twice changes
nothing:

1. ``pause``: every member releases the controller's partitions (drain then close: in-flight
   reconciles finish and are acked, prefetched deliveries go back) and takes none. Done when
   every live member of the controller says so in its heartbeat *and* the broker shows no
   consumer on any of its partitions (a member frozen or cut off still holds its consumer).
2. ``rebind``: a grow declares the new partition queues (p{old}..p{N-1}, leaders spread over
   a cluster's nodes) and binds them in index order; a shrink unbinds the highest ones,
   highest first, and sends what they hold back through the exchange (confirmed, then acked),
   then deletes them. Every remaining partition's clean marker is deleted: all hold messages
   routed by the old ring.
3. ``resume``: the layout says N partitions, version +1; members consume again, and each first
   owner of a partition re-routes its backlog through the exchange (the ring-drift guard)
   before reconciling anything. Done when every live member consumes the new version and every
   partition has a consumer; the layout's resize is cleared.

Publishers keep publishing to ``ctl.C`` throughout: events wait in the partitions (the delay
tiers dead-letter into whatever the ring is when they expire), none is lost. Keys pause from
the start of the pause to the first reconcile after the re-route; the pause waits for in-flight
reconciles, so a controller with 5-minute reconciles pauses that long.

Only one resize of a controller runs at a time: it holds the exclusive queue ``ctl.C.resize``,
which the broker deletes with the connection (a killed resizer frees it at once); a second one
refuses, naming the first. A resize also refuses while a member of the controller runs a
ctlpool that knows no layouts (its heartbeat lacks ``layouts``), during a broker alarm, or when a
grow would not fit the broker's file handles (``pool.budget``).
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable

import msgspec.structs

from . import budget, codec, copies, layout as layouts, membership, topology
from .amqp import ChannelGone, Connection, connect
from .errors import CtlpoolError
from .names import Names, members_exchange
from .replicas import Unavailable
from .settings import BrokerSettings, TopologySettings

MAX_PARTITIONS = 1000  # partition names keep three digits (p000-p999): dashboards and permissions keep working
POLL_S = 0.25  # how often a step looks whether it is done
LISTEN_S = 2.5  # heartbeats heard before deciding who the members are (a little over two intervals)
SAY_EVERY_S = 5.0  # a step still waiting says what it waits for this often
DRAIN_WINDOW = 500  # unconfirmed re-routes in flight while a shrink empties a removed partition
SETTLE_S = 1.0  # after unbinding, before emptying the removed partitions (see Resizer._shrink)
RESOURCE_LOCKED = 405  # AMQP: an exclusive queue another connection holds
CLOSE_WAIT_S = 3.0  # a resize waits this long for its connection to close (and its lock to go) before it returns


class ResizeRefused(CtlpoolError):
    """What stops a resize, in one line."""


@dataclass
class Members:
    """Who is alive (heard on the members exchange), kept by a listening consumer."""

    table: membership.MemberTable

    def of(self, controller: str) -> list[membership.Heartbeat]:
        self.table.expire()
        return [hb for hb in self.table.live() if controller in hb.controllers]


async def listen(conn: Connection, prefix: str, member_timeout_s: float = 5.0) -> Members:
    members = Members(membership.MemberTable(member_timeout_s, time.monotonic))
    ch = await conn.channel()
    ok = await ch.rpc("queue_declare", queue="", exclusive=True, auto_delete=True)
    await ch.rpc("queue_bind", queue=ok.method.queue, exchange=members_exchange(prefix))

    def on_message(_c: Any, _m: Any, props: Any, body: bytes) -> None:
        if getattr(props, "type", None) != layouts.KIND:
            hb = membership.decode(body)
            if hb is not None:
                members.table.observe(hb)
    await ch.consume(ok.method.queue, on_message, auto_ack=True)
    await asyncio.sleep(LISTEN_S)
    return members


class Resizer:
    """Drives one controller's resize to its end (see the module docstring)."""

    def __init__(self, conn: Connection, broker: BrokerSettings, topo: TopologySettings, controller: str, *,
                 say: Callable[[str], None], place: list[Connection] | None = None) -> None:
        self.conn = conn
        self.broker = broker
        self.topo = topo
        self.names = Names(broker.prefix, controller)
        self.controller = controller
        self.say = say
        self.place = place or []
        self.members: Members | None = None
        self.notices: Any = None

    async def lock(self) -> None:
        """Hold the controller's resize lock, or refuse naming who holds it."""
        ch = await self.conn.channel()
        try:
            await ch.rpc("queue_declare", queue=self.names.resize_lock, exclusive=True, auto_delete=True)
        except ChannelGone as exc:
            if exc.reply_code != RESOURCE_LOCKED:
                raise
            live = await layouts.read(self.conn, self.names)
            raise ResizeRefused(f"another resize of {self.controller} is running"
                                + (f": {live.describe()}" if live is not None else "")) from None

    async def start(self, to: int) -> layouts.Layout:
        """Check, then write the pause (or pick up the resize in progress): the layout to drive."""
        if not 1 <= to <= MAX_PARTITIONS:
            raise ResizeRefused(f"--partitions {to}: expected 1 to {MAX_PARTITIONS}")
        if not await self.conn.exists("exchange", self.names.exchange):
            raise ResizeRefused(f"controller {self.controller!r} does not exist on the broker "
                                f"(no exchange {self.names.exchange})")
        live = await layouts.read(self.conn, self.names)
        if live is None:  # declared by a ctlpool before layouts: adopt its count first
            live = await topology.declare_controller(self.conn, self.broker.prefix, self.controller, self.topo,
                                                     self.place)
        if live.resize is not None:
            if live.resize.to != to:
                raise ResizeRefused(f"a resize of {self.controller} to {live.resize.to} partitions is unfinished "
                                    f"({live.describe()}); finish it first: ctlpool topology resize "
                                    f"{self.controller} --partitions {live.resize.to}")
            self.say(f"resuming the resize in progress: {live.describe()}")
            return live
        if to == live.partitions:
            return live
        await self._check(live, to)
        return await self._write(msgspec.structs.replace(live, resize=layouts.Resize(
            to=to, step="pause", source=live.partitions, by=f"{socket.gethostname()}:{os.getpid()}",
            since=time.time())))

    async def _check(self, live: layouts.Layout, to: int) -> None:
        members = await self._members()
        old = [hb for hb in members.of(self.controller) if self.controller not in hb.layouts]
        if old:
            raise ResizeRefused(f"member {old[0].id} (pid {old[0].pid} on {old[0].node}) runs a ctlpool that "
                                f"knows no resize: upgrade or stop the {len(old)} such member(s) first")
        blocked = next((hb for hb in members.of(self.controller) if hb.blocked), None)
        if blocked is not None:
            raise ResizeRefused(f"the broker blocks publishing ({blocked.blocked}): a memory or disk alarm; "
                                "resize once it is over")
        if to > live.partitions:
            try:
                room = await asyncio.to_thread(budget.read, self.broker.admin_node, self.broker.amqp_url)
            except Unavailable as exc:
                self.say(f"the broker's file handles can't be read here, so the new queues aren't checked against "
                         f"them ({exc})")
            else:
                problem = room.refusal(to - live.partitions)
                if problem:
                    raise ResizeRefused(problem)

    async def _members(self) -> Members:
        if self.members is None:
            self.members = await listen(self.conn, self.broker.prefix)
        return self.members

    async def _write(self, live: layouts.Layout) -> layouts.Layout:
        live = await layouts.write(self.conn, self.names, live, topology.layout_args(self.topo))
        if self.notices is None:
            self.notices = await self.conn.channel()
        layouts.notice(self.notices, members_exchange(self.broker.prefix), live)
        if live.resize is not None:
            self.say(f"step {live.resize.step}: {live.describe()}")
        return live

    async def drive(self, live: layouts.Layout) -> layouts.Layout:
        """Run the remaining steps; returns the final layout."""
        while live.resize is not None:
            r = live.resize
            if r.step == "pause":
                await self._paused(live)
                live = await self._write(msgspec.structs.replace(live, resize=replace_step(r, "rebind")))
            elif r.step == "rebind":
                await (self._grow(r.source, r.to) if r.to > r.source else self._shrink(r.source, r.to))
                live = await self._write(msgspec.structs.replace(live, partitions=r.to, version=live.version + 1,
                                                                 resize=replace_step(r, "resume")))
            else:
                await self._resumed(live)
                live = await self._write(msgspec.structs.replace(live, resize=None, resizes=live.resizes + 1))
        return live

    # ---- pause: nobody consumes any partition of the controller

    async def _paused(self, live: layouts.Layout) -> None:
        members = await self._members()
        queues = [q for q in self._queues(max(live.partitions, live.resize.to)) if await self.conn.exists("queue", q)]
        await self._until(lambda: self._quiet(members, queues), "every member to release its partitions")

    async def _quiet(self, members: Members, queues: list[str]) -> str | None:
        holding = [hb.id for hb in members.of(self.controller) if self.controller not in hb.paused]
        if holding:
            return f"members still holding partitions: {', '.join(holding[:5])}"
        busy = [q.name for q in await topology.counts(self.conn, queues) if q is not None and q.consumers]
        if busy:
            return f"partitions still consumed (a member frozen or cut off holds them): {', '.join(busy[:5])}"
        return None

    # ---- rebind

    async def _grow(self, source: int, to: int) -> None:
        ch = await self.conn.channel()
        placers = [await c.channel() for c in self.place]
        try:
            for i in range(source, to):
                q = self.names.partition(i, to)
                via = placers[(i - source) % len(placers)] if placers else ch
                await via.rpc("queue_declare", queue=q, durable=True,
                              arguments=topology.partition_args(self.names, self.topo))
                await ch.rpc("queue_bind", queue=q, exchange=self.names.exchange, routing_key="1")
            for i in range(to):  # every partition may hold messages of another ring now
                await ch.rpc("exchange_delete", exchange=self.names.clean_marker(i, to))
        finally:
            for c in (ch, *placers):
                await c.close()

    async def _shrink(self, source: int, to: int) -> None:
        ch = await self.conn.channel()
        try:
            for i in reversed(range(to, source)):  # the last binding first: the others keep their buckets
                q = self.names.partition(i, source)
                if await self.conn.exists("queue", q):
                    await ch.rpc("queue_unbind", queue=q, exchange=self.names.exchange, routing_key="1")
            for i in range(source):
                await ch.rpc("exchange_delete", exchange=self.names.clean_marker(i, source))
        finally:
            await ch.close()
        removed = [q for q in (self.names.partition(i, source) for i in range(to, source))
                   if await self.conn.exists("queue", q)]
        await asyncio.sleep(SETTLE_S)  # an enqueue routed just before its unbind commits a little later (quorum)
        moved = await asyncio.gather(*(self._empty(q) for q in removed))
        for q in removed:
            await self._delete(q)
        if removed:
            self.say(f"removed {len(removed)} partitions ({removed[0]} .. {removed[-1]}): the {sum(moved)} events "
                     f"they held sent on through {self.names.exchange}")

    async def _empty(self, queue: str) -> int:
        """Send everything ``queue`` holds through the exchange, each acked once confirmed. It is
        unbound and nobody consumes it (the members paused), and what was routed to it before the
        unbind has committed (``SETTLE_S``): a round takes what the queue reports ready, the channel
        closes (a delivery prefetched beyond that goes back), until a round finds it empty."""
        moved = 0
        while True:
            count = (await topology.counts(self.conn, [queue]))[0]
            left = count.ready if count is not None else 0
            if not left:
                return moved
            moved += await self._round(queue, left)

    async def _round(self, queue: str, left: int) -> int:
        pub = await self.conn.confirm_channel()
        ch = await self.conn.channel()
        try:
            await ch.rpc("basic_qos", prefetch_count=min(left, DRAIN_WINDOW))
            got: asyncio.Queue[tuple[Any, Any, bytes]] = asyncio.Queue()
            await ch.consume(queue, lambda _c, m, p, b: got.put_nowait((m, p, b)))
            pending: list[asyncio.Future[None]] = []
            for _ in range(left):
                method, props, body = await got.get()
                headers = codec.clean_headers(props.headers)
                fut = pub.publish(self.names.exchange, method.routing_key, body, headers,
                                  copies.fit(copies.properties(props, headers), pub.frame_max))
                fut.add_done_callback(lambda f, t=method.delivery_tag: _ack_if_confirmed(ch, t, f))
                pending.append(fut)
                if len(pending) >= DRAIN_WINDOW // 2:
                    await asyncio.gather(*pending)
                    pending = []
            await asyncio.gather(*pending)
            await asyncio.sleep(0)  # the last acks leave before the close
            return left
        finally:
            await ch.close()  # what it prefetched beyond ``left`` goes back, for the next round
            await pub.ch.close()

    async def _delete(self, queue: str) -> None:
        ch = await self.conn.channel()
        try:
            await ch.rpc("queue_delete", queue=queue)
            await ch.rpc("exchange_delete", exchange=f"{queue}.clean")
        finally:
            await ch.close()

    # ---- resume: every member consumes the new layout

    async def _resumed(self, live: layouts.Layout) -> None:
        members = await self._members()
        queues = self._queues(live.partitions)

        async def consumed() -> str | None:
            behind = [hb.id for hb in members.of(self.controller)
                      if hb.layouts.get(self.controller) != live.version or self.controller in hb.paused]
            if behind:
                return f"members not yet on layout version {live.version}: {', '.join(behind[:5])}"
            if not members.of(self.controller):
                return None  # no pool runs it: the first one to start consumes the new layout
            idle = [q.name for q in await topology.counts(self.conn, queues) if q is None or not q.consumers]
            return f"partitions not consumed yet: {', '.join(idle[:5])}" if idle else None
        await self._until(consumed, "every member to consume the new layout")

    # ---- helpers

    def _queues(self, partitions: int) -> list[str]:
        return [self.names.partition(i, partitions) for i in range(partitions)]

    async def _until(self, waiting: Callable[[], Any], what: str) -> None:
        said = time.monotonic()
        while True:
            why = await waiting()
            if why is None:
                return
            if time.monotonic() - said >= SAY_EVERY_S:
                said = time.monotonic()
                self.say(f"waiting for {what}: {why}")
            await asyncio.sleep(POLL_S)


def _ack_if_confirmed(ch: Any, tag: int, fut: asyncio.Future[None]) -> None:
    if not fut.cancelled() and fut.exception() is None and ch.is_open:
        ch.raw.basic_ack(tag)


def replace_step(r: layouts.Resize, step: str) -> layouts.Resize:
    return msgspec.structs.replace(r, step=step)


async def resize(broker: BrokerSettings, topo: TopologySettings, controller: str, to: int,
                 say: Callable[[str], None]) -> layouts.Layout:
    """The command: lock, start (or pick up) the resize, drive it to the end."""
    conn = await connect(broker.amqp_url, name=f"ctlpool-resize {controller}", heartbeat_s=broker.heartbeat_s)
    place = await topology.node_connections(broker)
    try:
        r = Resizer(conn, broker, topo, controller, say=say, place=place)
        await r.lock()
        live = await r.start(to)
        if live.resize is None:
            say(f"{controller} already has {to} partitions")
            return live
        return await r.drive(live)
    finally:
        for c in (conn, *place):
            c.close()
        # the lock goes with the connection: let the close finish before the loop ends
        await asyncio.wait([c.closed for c in (conn, *place)], timeout=CLOSE_WAIT_S)


