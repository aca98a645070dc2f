"""One worker process: consume owned partitions, reconcile keys one at a time, ack after confirms.

Data flow, per delivery (``_on_message``, on the loop thread):

1. too many deliveries already (a message that kills workers) -> park;
2. inside a partition's ring-drift guard window (the backlog present when the partition
   was acquired) -> re-route through the exchange, ack on confirm, no reconcile;
3. still owes a delay (``x-ctlpool-delay-ms``) -> ride the next delay tier, ack on confirm;
4. decode once (undecodable / invalid -> park), then ``WorkQueue.add((controller, key))``.

``_pump`` starts reconciles while fewer than ``concurrency`` run. A reconcile covers every
delivery collected for its key; when it ends, whatever it published (``ctx.publish``,
a retry, a requeue, a parked copy) is confirmed first, then all those deliveries are acked.

Partitions are acquired by opening a channel and consuming (single-active-consumer on
quorum queues, ``exclusive`` on classic ones: the broker is the lock). Release and drain
never cancel a consumer with work in flight (DESIGN fact 2): stop dispatching, let in-flight
reconciles finish and ack, re-route the prefetched rest, then close the channel.
On connection loss, in-flight reconciles are cancelled at once; their deliveries go back
to the broker with the connection.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import pika

from . import codec, eager, journal, outcome
from .acks import AckBatch
from .amqp import NOT_FOUND, ChannelGone, Channel, ConfirmChannel, Connection, connect
from . import membership
from .assignment import Member, owned_by
from .membership import MemberTable
from .codec import DecodeFailed
from .controller import Context, Controller, is_async
from .errors import BrokerError
from .fence import LEASE_FRACTION, Fenced, Lease, first_step
from .messages import WorkerState
from .metrics import WorkerMetrics
from .retries import next_hop
from .settings import PoolSettings, redact_url
from .topology import Names, declare_clean_marker, is_clean, members_exchange

log = logging.getLogger("ctlpool.worker")

SETTLE_INTERVALS = 2  # heartbeat intervals a new member listens before taking partitions
RECONNECT_FIRST_S = 0.5  # first reconnect delay; doubles up to broker.reconnect_max_s
ACQUIRE_RETRY_S = 1.0  # a partition another consumer still holds (classic exclusive) is retried this often
JITTER = 0.2  # ±20% on reconnect delays, so a fleet doesn't reconnect in lockstep
MISSING_LOG_S = 30.0  # a missing partition queue is retried every heartbeat, logged this often
SETTLE_RETRY_S = 5.0  # a delivery whose retry/park publish the broker refused goes back to its queue after this
BLAME_TTL_S = 600.0  # a crashed reconcile's event not seen again within this long is forgotten
DUPLICATE_LOG_S = 60.0  # another process announcing our member id is logged this often


class _Ctl:
    """A controller and what the worker derives from it once."""

    __slots__ = ("index", "controller", "name", "names", "decode", "is_async", "exchange")

    def __init__(self, index: int, controller: Controller, prefix: str) -> None:
        self.index = index
        self.controller = controller
        self.name = controller.name
        self.names = Names(prefix, controller.name)
        self.exchange = self.names.exchange
        self.decode = codec.make_decoder(controller.event_type)
        self.is_async = is_async(controller)


class Partition:
    """One partition queue this worker consumes (or is acquiring / releasing)."""

    __slots__ = ("ctl", "index", "queue", "ch", "guard_left", "held", "dispatched", "idle",
                 "releasing", "acquired_at", "rerouted", "unacked", "guarding", "guard_futs", "may_mark", "acks")

    def __init__(self, ctl: _Ctl, index: int, queue: str) -> None:
        self.ctl = ctl
        self.index = index
        self.queue = queue
        self.ch: Channel | None = None
        self.guard_left = 0  # deliveries still to re-route (ring-drift guard window)
        self.guarding = False  # not known clean in this broker epoch: re-route backlog and redeliveries
        self.guard_futs: list[asyncio.Future[None]] = []  # confirms of the window's re-routes
        self.may_mark = False  # we were the only consumer when the window was measured
        self.acks = AckBatch()  # of the current channel
        self.held: list[tuple[Any, Any, bytes]] | None = None  # deliveries parked while measuring/releasing
        self.dispatched = 0  # deliveries of this partition inside running reconciles
        self.idle = asyncio.Event()
        self.idle.set()
        self.releasing = False
        self.acquired_at = 0.0
        self.rerouted = 0
        self.unacked = 0  # deliveries received and not yet acked (shown by ``ctlpool status``)


class Delivery:
    """A decoded delivery waiting in, or covered by, a reconcile."""

    __slots__ = ("part", "ch", "tag", "key", "event", "headers", "attempt", "body", "content_type", "redeliveries",
                 "queued_at")

    def __init__(self, part: Partition, ch: Channel, tag: int, key: str, event: Any, headers: dict[str, Any] | None,
                 attempt: int, body: bytes, content_type: str | None, redeliveries: int) -> None:
        self.part = part
        self.ch = ch
        self.tag = tag
        self.key = key
        self.event = event
        self.headers = headers
        self.attempt = attempt
        self.body = body
        self.content_type = content_type
        self.redeliveries = redeliveries


@dataclass
class WorkerStats:
    """Counters since the worker started (read by metrics and tests)."""

    deliveries: int = 0
    reconciles: int = 0
    succeeded: int = 0
    failed: int = 0
    requeued: int = 0
    parked: dict[str, int] = field(default_factory=dict)
    rerouted: int = 0
    hops: int = 0
    acquisitions: int = 0
    releases: int = 0


class Worker:
    """See the module docstring. ``run()`` returns when drained (or on ``request_exit``)."""

    def __init__(
        self,
        *,
        settings: PoolSettings,
        controllers: list[Controller],
        index: int = 0,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
        on_state: Callable[[WorkerState], None] | None = None,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        from .workqueue import WorkQueue

        self.settings = settings
        self.index = index
        self.member_id = f"{settings.node_id}/{index}"
        self.clock = clock
        self.wall = wall
        self.rand = rand
        self.on_state = on_state or (lambda state: None)
        self.ctls = [_Ctl(i, c, settings.broker.prefix) for i, c in enumerate(controllers)]
        self.stats = WorkerStats()
        self.metrics = metrics if metrics is not None else WorkerMetrics()
        self.metrics.sampler = self._sample_metrics
        self._wq: WorkQueue[tuple[int, str], Delivery] = WorkQueue()
        self._inflight = 0
        self._tasks: dict[asyncio.Task[None], float] = {}  # running reconciles -> deadline (clock)
        self._timed_out: set[asyncio.Task[None]] = set()
        self._ack_parts: list[Partition] = []  # partitions with acks to flush this loop iteration
        self._parts: dict[tuple[int, int], Partition] = {}
        self._pub: ConfirmChannel | None = None
        self._publish_conn: Connection | None = None
        self._consume_conn: Connection | None = None
        self._connected = False
        self._members = MemberTable(settings.worker.member_timeout_s, clock)
        self._hb_ch: Channel | None = None
        self._acquiring: set[asyncio.Task[None]] = set()
        self._releasing: set[asyncio.Task[None]] = set()
        self._started = wall()
        self._joined = False  # listened for peers; may take partitions
        self._served = False  # this session reached "ready" (resets the reconnect backoff)
        # set when a partition loses its consumer while the connection stays up (see _partition_lost)
        self._session_lost: asyncio.Future[ChannelGone] | None = None
        self._missing_logged: dict[str, float] = {}  # partition queue -> when we last said it is missing
        self._conns: list[Connection] = []
        self._known_exchanges = {c.exchange for c in self.ctls}
        self._stop = asyncio.Event()
        self._threads = concurrent.futures.ThreadPoolExecutor(
            max_workers=settings.worker.concurrency, thread_name_prefix="reconcile")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        wk = settings.worker
        self._concurrency = wk.concurrency
        self._timeout_s = wk.reconcile_timeout_s
        self._guard = wk.reroute_on_acquire
        self._max_deliveries = settings.topology.max_deliveries
        self._journal: journal.Journal | None = None
        # events inside a reconcile when this slot's last process died -> (deaths blamed, forget after)
        self._blamed: dict[bytes, tuple[int, float]] = {}
        self._lease = Lease(clock, float("inf"))  # replaced per session (see pool.fence)
        self._duplicate_logged = -1e9
        self._quorum = settings.topology.queue_type == "quorum"
        self._tiers = settings.topology.tiers_s

    # ---------------------------------------------------------------- lifecycle

    def request_stop(self) -> None:
        """Drain: stop dispatching, finish in-flight reconciles, release, exit ``run``."""
        self._stop.set()

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._open_journal()
        for c in self.ctls:
            c.controller.setup()
        backoff = RECONNECT_FIRST_S
        while not self._stop.is_set():
            self._served = False
            try:
                await self._session()
            except (BrokerError, ChannelGone, OSError) as exc:
                log.warning("broker session failed: %s", exc, extra={"worker": self.index})
            finally:
                await self._teardown()
            if self._served:  # a session that got as far as consuming: the next outage starts afresh
                backoff = RECONNECT_FIRST_S
            if self._stop.is_set():
                break
            delay = backoff * (1 + JITTER * (2 * self.rand() - 1))
            log.info("reconnecting in %.1fs to %s", delay, redact_url(self.settings.broker.amqp_url),
                     extra={"worker": self.index})
            self.on_state(WorkerState.RECONNECTING)
            try:
                await asyncio.wait_for(self._stop.wait(), delay)
            except asyncio.TimeoutError:
                pass
            backoff = min(backoff * 2, self.settings.broker.reconnect_max_s)
        self._threads.shutdown(wait=True)
        if self._journal is not None:
            self._journal.close()
        self.on_state(WorkerState.STOPPED)

    def _open_journal(self) -> None:
        """Take the blame the slot's previous process left (``pool.journal``) and start a fresh journal."""
        path = journal.path_for(self.settings.state_dir, self.settings.node_id, self.index)
        try:
            self._journal, leftover = journal.Journal.take_leftover(path, self._concurrency)
        except OSError as exc:
            log.error("cannot keep the in-flight journal %s (%s); a worker-killing event will only be parked "
                      "by the broker's delivery limit; check --state-dir", path, exc, extra={"worker": self.index})
            return
        if leftover:
            log.warning("the previous worker %d died inside %d reconcile(s); each of those events counts one "
                        "more delivery toward --max-deliveries when it comes back", self.index, len(leftover),
                        extra={"worker": self.index})
            expires = self.clock() + BLAME_TTL_S
            self._blamed = {d: (n, expires) for d, n in leftover.items()}

    async def _session(self) -> None:
        """One connected period: connect, join, acquire, serve until stop (drain) or connection loss."""
        b = self.settings.broker
        consume = await connect(b.amqp_url, name=f"ctlpool {self.member_id} consume", heartbeat_s=b.heartbeat_s)
        self._conns.append(consume)
        self._session_lost = asyncio.get_running_loop().create_future()
        publish = await connect(b.amqp_url, name=f"ctlpool {self.member_id} publish", heartbeat_s=b.heartbeat_s)
        self._conns.append(publish)
        self._pub = await publish.confirm_channel()
        self._publish_conn = publish
        self._consume_conn = consume
        self._connected = True
        self._members = MemberTable(self.settings.worker.member_timeout_s, self.clock)
        # Heartbeats are sent from the publish connection: the broker blocks a connection that
        # publishes during an alarm, and a blocked consume connection can't even be closed.
        self._hb_ch = await publish.channel()
        listen = await consume.channel()
        ok = await listen.rpc("queue_declare", queue="", exclusive=True, auto_delete=True)
        await listen.rpc("queue_bind", queue=ok.method.queue, exchange=members_exchange(b.prefix))
        await listen.consume(ok.method.queue, self._on_heartbeat, auto_ack=True)
        # Before any partition is taken: from here on, a lost lease means the broker may have
        # given our partitions away (pool.fence); our own heartbeats echo back every interval.
        self._lease = Lease(self.clock, LEASE_FRACTION * consume.heartbeat_s if consume.heartbeat_s else float("inf"),
                            on_lost=self._fence)
        consume.on_data(self._lease.heard)
        self._heartbeat()
        ticker = asyncio.ensure_future(self._membership_loop())
        # Listen before taking anything: peers already running announce themselves within an
        # interval, so a newcomer doesn't grab the whole controller and hand most of it back.
        await self._sleep(SETTLE_INTERVALS * self.settings.worker.heartbeat_interval_s)
        if not self._stop.is_set():
            self._joined = True
            self._rebalance()
            await self._settled()
            if self._session_lost.done():
                raise self._session_lost.result()
            log.info("member %s consuming %d partitions (%d members)", self.member_id, self._active_count(),
                     len(self._members.live()), extra={"worker": self.index})
            self.on_state(WorkerState.READY)
            self._served = True
        stop = asyncio.ensure_future(self._stop.wait())
        lost = [consume.closed, publish.closed, self._pub.ch.closed, self._session_lost]
        try:
            done, _ = await asyncio.wait([stop, *lost], return_when=asyncio.FIRST_COMPLETED)
        finally:
            ticker.cancel()
        if stop in done:
            await self._drain()
            return
        stop.cancel()
        if self._session_lost.done():
            raise self._session_lost.result()
        reason = next(f.result() for f in lost if f.done())
        raise ChannelGone(reason.reply_code, f"connection lost: {reason.reply_text}")

    def _fence(self, why: str) -> None:
        """The lease ran out (pool.fence): cancel everything in flight and rejoin, like a connection loss."""
        session = self._session_lost
        if session is None or self._loop is None:
            return
        if threading.get_ident() != self._loop_thread:  # a plain-def reconcile's ctx.check() noticed
            self._loop.call_soon_threadsafe(self._fence, why)
            return
        if session.done():
            return
        log.warning("fencing: %s; cancelling %d in-flight reconciles and rejoining", why, len(self._tasks),
                    extra={"worker": self.index})
        self.metrics.fenced()
        session.set_result(ChannelGone(0, f"fenced: {why}"))

    async def _sleep(self, seconds: float) -> None:
        """Sleep, waking early on stop."""
        try:
            await asyncio.wait_for(self._stop.wait(), seconds)
        except asyncio.TimeoutError:
            pass

    async def _settled(self) -> None:
        """Wait until no acquisition is pending (classic partitions a peer still holds are retried)."""
        while self._acquiring and not self._stop.is_set():
            await asyncio.wait(set(self._acquiring), timeout=1.0)

    def _active_count(self) -> int:
        return sum(1 for p in self._parts.values() if p.ch is not None and not p.releasing)

    # ---------------------------------------------------------------- membership

    def _on_heartbeat(self, _ch: Any, _method: Any, _props: Any, body: bytes) -> None:
        hb = membership.decode(body)
        if hb is None:
            return
        if hb.id == self.member_id and hb.pid != os.getpid():
            now = self.clock()
            if now - self._duplicate_logged >= DUPLICATE_LOG_S:
                self._duplicate_logged = now
                log.error("another process (pid %d on %s) announces member id %s too; --node-id must be unique "
                          "per host, or the two share partitions unpredictably", hb.pid, hb.node, hb.id,
                          extra={"worker": self.index})
            return
        if self._members.observe(hb):
            self._rebalance()

    def _heartbeat(self, bye: bool = False) -> None:
        if self._hb_ch is None or not self._hb_ch.is_open:
            return
        parts: dict[str, dict[int, int]] = {}
        for part in self._parts.values():
            if part.ch is not None and not part.releasing:
                parts.setdefault(part.ctl.name, {})[part.index] = part.unacked
        hb = membership.Heartbeat(id=self.member_id, node=self.settings.node_id, worker=self.index,
                                  weight=self.settings.weight, started=self._started,
                                  controllers=tuple(c.name for c in self.ctls), bye=bye, parts=parts,
                                  pid=os.getpid(), blocked=self._blocked_reason())
        # not persistent, not confirmed: a lost heartbeat is just a late one
        self._hb_ch.raw.basic_publish(members_exchange(self.settings.broker.prefix), "", membership.encode(hb))

    def _blocked_reason(self) -> str:
        conn = self._publish_conn
        reason = conn.blocked if conn is not None else None
        self.metrics.broker_blocked(reason is not None)
        return reason or ""

    async def _membership_loop(self) -> None:
        interval = self.settings.worker.heartbeat_interval_s
        while True:
            await asyncio.sleep(interval)
            self._heartbeat()
            self._expire_reconciles()
            if self._blamed:  # while any is left, every delivery pays for a digest: forget them in time
                now = self.clock()
                self._blamed = {d: b for d, b in self._blamed.items() if b[1] > now}
            gone = self._members.expire()
            if gone:
                log.info("members gone (no heartbeat for %.0fs): %s", self.settings.worker.member_timeout_s,
                         ", ".join(gone), extra={"worker": self.index})
            self._rebalance()

    def _rebalance(self) -> None:
        """Acquire partitions this member should own and release the rest, in the background."""
        if self._stop.is_set() or not self._connected or not self._joined:
            return
        live = self._members.live()
        p = self.settings.topology.partitions
        for ctl in self.ctls:
            members = [Member(hb.id, hb.weight) for hb in live if ctl.name in hb.controllers]
            if not any(m.id == self.member_id for m in members):
                members.append(Member(self.member_id, self.settings.weight))
            want = owned_by(self.member_id, members, ctl.name, p)
            for index in sorted(want):
                if (ctl.index, index) not in self._parts:
                    self._spawn(self._acquire(ctl.index, index), self._acquiring)
            for (ci, index), part in list(self._parts.items()):
                if ci == ctl.index and index not in want and not part.releasing:
                    self._spawn(self._release(part), self._releasing)

    def _spawn(self, coro: Any, bucket: set[asyncio.Task[None]]) -> None:
        task = asyncio.ensure_future(coro)
        bucket.add(task)
        task.add_done_callback(lambda t: self._task_done(t, bucket))

    def _task_done(self, task: asyncio.Task[None], bucket: set[asyncio.Task[None]]) -> None:
        bucket.discard(task)
        exc = None if task.cancelled() else task.exception()
        if exc is not None and not isinstance(exc, ChannelGone):
            log.error("partition task failed: %s", exc, extra={"worker": self.index})

    def _partition_lost(self, part: Partition, ch: Channel, session: asyncio.Future[ChannelGone], why: str) -> None:
        """The broker closed a partition's channel or cancelled its consumer, the connection being fine.

        The partition would otherwise stay "owned" with nothing consuming it. Start over the way
        a connection loss does (in-flight reconciles cancelled, every delivery back to the broker,
        reconnect, re-acquire): one well-trodden path keeps G1, where patching up one partition
        while its keys may still be in flight would not."""
        if session.done() or part.ch is not ch or part.releasing or self._stop.is_set() or ch.conn.closed.done():
            return  # a release, a drain or a lost connection closed it; or the session is ending anyway
        log.warning("partition %s lost its consumer (%s); reconnecting", part.queue, why,
                    extra={"worker": self.index, "partition": part.index, "controller": part.ctl.name})
        session.set_result(ChannelGone(0, f"partition {part.queue}: {why}"))

    async def _drain(self) -> None:
        self.on_state(WorkerState.DRAINING)
        # Say goodbye first: peers subscribe right away (standby behind our consumers), so
        # each partition changes hands the moment we close its channel.
        self._heartbeat(bye=True)
        for t in list(self._acquiring):
            t.cancel()
        releases = [self._release(p) for p in list(self._parts.values()) if not p.releasing]
        try:
            await asyncio.wait_for(asyncio.gather(*releases, *self._releasing, return_exceptions=True),
                                   self.settings.worker.drain_timeout_s)
        except asyncio.TimeoutError:
            log.warning("drain timed out after %.0fs; in-flight deliveries go back to the broker",
                        self.settings.worker.drain_timeout_s, extra={"worker": self.index})

    async def _teardown(self) -> None:
        """Cancel in-flight reconciles (their deliveries return with the connection), close everything."""
        self._connected = False
        self._joined = False
        self._wq.remove_where(lambda d: True)
        for t in [*self._tasks, *self._acquiring, *self._releasing]:
            t.cancel()
        for conn in self._conns:
            conn.close()
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        self._parts.clear()
        self._conns.clear()
        self._pub = None
        self._publish_conn = None
        self._hb_ch = None
        await asyncio.sleep(0)

    # ---------------------------------------------------------------- partitions

    async def _acquire(self, ci: int, index: int) -> None:
        ctl = self.ctls[ci]
        p = self.settings.topology.partitions
        part = Partition(ctl, index, ctl.names.partition(index, p))
        self._parts[(ci, index)] = part
        while not part.releasing:
            ch = await self._consume_conn.channel()
            await ch.rpc("basic_qos", prefetch_count=self.settings.worker.prefetch)
            part.ch = ch
            part.acks = AckBatch()
            part.guard_left = 0
            # a partition already cleared since the broker (and its ring) last started needs no guard
            part.guarding = self._guard and not await is_clean(self._consume_conn, ctl.names, index, p)
            part.held = [] if part.guarding else None  # hold deliveries until the guard window is known
            part.acquired_at = self.clock()
            try:
                await ch.consume(part.queue, lambda c, m, pr, b, part=part, ch=ch: self._on_message(part, ch, m, pr, b),
                                 exclusive=not self._quorum)
                self.stats.acquisitions += 1
                self.metrics.handover(ctl.name, "acquired")
                session = self._session_lost
                assert session is not None
                ch.closed.add_done_callback(
                    lambda f, ch=ch: self._partition_lost(part, ch, session, f"channel closed: {f.result()}"))
                ch.cancelled.add_done_callback(
                    lambda f, ch=ch: self._partition_lost(part, ch, session, "consumer cancelled by the broker"))
                if part.guarding:
                    await self._measure_guard(part, ch)
                return
            except ChannelGone as exc:
                if exc.reply_code == NOT_FOUND:
                    # deleted under us: serve the other partitions; the membership tick tries again
                    self._parts.pop((ci, index), None)
                    now = self.clock()
                    if now - self._missing_logged.get(part.queue, -1e9) >= MISSING_LOG_S:
                        self._missing_logged[part.queue] = now
                        log.error("partition queue %s does not exist; run 'ctlpool topology %s' (retrying)",
                                  part.queue, ctl.name, extra={"worker": self.index, "partition": index,
                                                               "controller": ctl.name})
                    return
                # 403: another exclusive consumer (classic) still holds it; try again shortly
                log.info("partition %s busy (%s); retrying", part.queue, exc, extra={"worker": self.index})
                await asyncio.sleep(ACQUIRE_RETRY_S)

    async def _release(self, part: Partition) -> None:
        """Stop dispatching, wait for in-flight reconciles, re-route the prefetched rest, close the channel."""
        part.releasing = True
        if part.held is None:
            part.held = []
        queued = self._wq.remove_where(lambda d: d.part is part)
        await part.idle.wait()
        ch = part.ch
        if ch is not None and ch.is_open:
            confirms = [self._reroute_delivery(d) for d in queued if d.ch is ch]
            for method, props, body in part.held:
                n = self._redeliveries(props.headers, method, body)
                confirms.append(self._forward(part, ch, method, props, body, part.ctl.exchange,
                                              self._carried_headers(props, n)))
            part.held = []
            if confirms:
                await asyncio.gather(*confirms, return_exceptions=True)
            self._flush_acks()
            await ch.close()
        self._parts.pop((part.ctl.index, part.index), None)
        self.stats.releases += 1
        self.metrics.handover(part.ctl.name, "released")

    # ---------------------------------------------------------------- deliveries (hot path)

    def _on_message(self, part: Partition, ch: Channel, method: Any, props: Any, body: bytes) -> None:
        self.stats.deliveries += 1
        part.unacked += 1
        part.acks.delivered(method.delivery_tag)
        if part.held is not None:  # measuring the guard window, or releasing
            part.held.append((method, props, body))
            return
        try:
            d = self._admit(part, ch, method, props, body)
        except Exception as exc:  # noqa: BLE001 - nothing in one delivery's path may take the connection down
            log.exception("delivery could not be handled; parking it", extra={"worker": self.index,
                                                                           "controller": part.ctl.name})
            try:
                self._park_raw(ch, part, method, props, body, codec.PARK_INTERNAL, f"{type(exc).__name__}: {exc}")
            except Exception:  # noqa: BLE001 - not even parkable: the broker keeps it
                log.exception("could not park it either", extra={"worker": self.index})
                self._return_later(part, ch, method.delivery_tag)
            return
        if d is None:
            return
        self._wq.add((part.ctl.index, d.key), d)
        self.metrics.added(part.ctl.name)
        if self._inflight < self._concurrency:
            self._pump()

    def _admit(self, part: Partition, ch: Channel, method: Any, props: Any, body: bytes) -> Delivery | None:
        """A delivery for the work queue, or None when it was parked, re-routed or sent on a delay hop.

        Every header is read defensively (``codec.header_int``): a forged or corrupt value is
        ignored, never trusted, and can't raise."""
        headers = props.headers
        if headers is not None and codec.H_BAD_FRAME in headers:  # see pool.frames
            self._park_raw(ch, part, method, props, body, codec.PARK_BAD_HEADERS,
                           f"headers could not be decoded: {headers[codec.H_BAD_FRAME]}")
            return None
        redeliveries = 0
        if self._blamed or (headers is not None and codec.H_REDELIVERIES in headers):  # rare: skip the call
            redeliveries = self._redeliveries(headers, method, body)
            if redeliveries >= self._max_deliveries:
                self._park_raw(ch, part, method, props, body, codec.PARK_DELIVERIES,
                               f"its worker died inside its reconcile {redeliveries} times")
                return None
        if part.guarding and (part.guard_left or method.redelivered):
            # backlog from before we held the partition, or returned by a consumer that died
            # (maybe mid-guard): it may have been routed by an earlier ring, so route it again
            fut = self._forward(part, ch, method, props, body, part.ctl.exchange,
                                self._carried_headers(props, redeliveries))
            if part.guard_left:
                part.guard_left -= 1
                part.guard_futs.append(fut)
            self._count_reroute(part)
            return None
        attempt = 0
        if headers is not None:
            if codec.H_DELAY_MS in headers:
                delay_ms = codec.header_int(headers, codec.H_DELAY_MS, codec.MAX_DELAY_MS)
                if delay_ms:
                    self._hop(ch, part, method, props, body, delay_ms / 1000.0, redeliveries)
                    return None
            if codec.H_ATTEMPT in headers:
                attempt = codec.header_int(headers, codec.H_ATTEMPT, codec.MAX_ATTEMPT) or 0
        ctl = part.ctl
        try:
            event = ctl.decode(body)
        except DecodeFailed as exc:
            self._park_raw(ch, part, method, props, body, exc.reason, str(exc))
            return None
        d = Delivery(part, ch, method.delivery_tag, method.routing_key, event, headers, attempt, body,
                     props.content_type, redeliveries)
        d.queued_at = self.clock()
        return d

    def _redeliveries(self, headers: dict[str, Any] | None, method: Any, body: bytes) -> int:
        """Times this event was inside a reconcile when its worker died: what it carries (counted
        by other workers, kept across re-routes) or what this slot's journal says, the larger.
        Redeliveries for any other reason (connection flaps, broker restarts, drains, a frozen
        worker) don't count. The journal's count is kept, not used up: a re-routed copy and the
        original it came from (acked a moment later) are the same event. Only a redelivered
        message can be one the dead worker held, so only those pay for the digest."""
        carried = 0
        if headers is not None and codec.H_REDELIVERIES in headers:
            carried = codec.header_int(headers, codec.H_REDELIVERIES, codec.MAX_ATTEMPT) or 0
        if self._blamed and method.redelivered:
            blame = self._blamed.get(journal.digest(method.routing_key, body))
            if blame is not None:
                return max(carried, blame[0])
        return carried

    def _carried_headers(self, props: Any, redeliveries: int) -> dict[str, Any]:
        headers = codec.clean_headers(props.headers)
        headers.pop(codec.H_REDELIVERIES, None)
        if redeliveries:
            headers[codec.H_REDELIVERIES] = redeliveries
        return headers

    async def _measure_guard(self, part: Partition, ch: Channel) -> None:
        """Right after subscribing: the backlog to re-route is what we hold plus what is still ready.

        Every message routed by an earlier ring (DESIGN fact 1) was enqueued before the broker
        restart that preceded this connection, so it is in this count (or comes back
        redelivered, which is re-routed too). Over-counting only re-routes a few fresh
        events, which is harmless. Once the window is re-routed and confirmed, the partition's
        clean marker (see ``Names.clean_marker``) spares later owners in this broker epoch."""
        try:
            ok = await ch.rpc("queue_declare", queue=part.queue, passive=True)
        except ChannelGone:
            return
        if part.releasing:
            return  # _release re-routes what is held
        held = part.held or []
        part.guard_left = window = len(held) + ok.method.message_count
        # Another consumer (a standby, or an owner still finishing) may hold deliveries we can't
        # count; only a sole consumer may declare the partition clean afterwards.
        part.may_mark = ok.method.consumer_count <= 1
        if not window and part.may_mark:
            asyncio.ensure_future(self._mark_clean(part, []))
        if window:
            log.info("acquired %s: re-routing %d backlog events", part.queue, window,
                     extra={"worker": self.index, "partition": part.index, "controller": part.ctl.name})
        part.held = None
        # counted once already, when held (nothing arrives unheld while held is set, so
        # they are the newest tags); _on_message counts them again
        self.stats.deliveries -= len(held)
        part.unacked -= len(held)
        part.acks.forget_newest(len(held))
        for method, props, body in held:
            self._on_message(part, ch, method, props, body)

    def _count_reroute(self, part: Partition) -> None:
        part.rerouted += 1
        self.stats.rerouted += 1
        self.metrics.rerouted(part.ctl.name)
        if part.guard_left == 0 and part.guard_futs:
            futs, part.guard_futs = part.guard_futs, []
            if part.may_mark:
                asyncio.ensure_future(self._mark_clean(part, futs))
            log.info("%s: ring-drift guard re-routed %d events in %.0f ms", part.queue, part.rerouted,
                     (self.clock() - part.acquired_at) * 1000,
                     extra={"worker": self.index, "partition": part.index, "controller": part.ctl.name})

    async def _mark_clean(self, part: Partition, futs: list[asyncio.Future[None]]) -> None:
        """Once the whole window is re-routed (confirmed), later acquirers may skip the guard."""
        results = await asyncio.gather(*futs, return_exceptions=True)
        if any(isinstance(r, BaseException) for r in results) or part.ch is None or not part.ch.is_open:
            return  # the next owner re-routes what is left
        try:
            await declare_clean_marker(part.ch, part.ctl.names.clean_marker(part.index, self.settings.topology.partitions))
        except ChannelGone:
            pass

    def _hop(self, ch: Channel, part: Partition, method: Any, props: Any, body: bytes, delay_s: float,
             redeliveries: int) -> None:
        """The message still owes ``delay_s``: ride the next tier (or come back now if it's tiny)."""
        headers = self._carried_headers(props, redeliveries)
        self.stats.hops += 1
        self._forward(part, ch, method, props, body, self._delay_via(part.ctl, delay_s, headers), headers)

    def _delay_via(self, ctl: _Ctl, delay_s: float, headers: dict[str, Any]) -> str:
        """The exchange that serves ``delay_s`` next (a tier, or the controller's own when it is
        tiny), recording in ``headers`` the delay still owed after that hop."""
        tier, left = next_hop(delay_s, self._tiers)
        if tier is None:
            headers.pop(codec.H_DELAY_MS, None)
            return ctl.exchange
        headers[codec.H_DELAY_MS] = int(left * 1000)
        return ctl.names.tier(tier)

    def _forward(self, part: Partition, ch: Channel, method: Any, props: Any, body: bytes, exchange: str,
                 headers: dict[str, Any], routing_key: str | None = None) -> asyncio.Future[None]:
        """Republish a delivery fresh to ``exchange``; ack it once confirmed (left unacked on failure)."""
        assert self._pub is not None
        fut = self._timed(self._pub.publish(exchange, routing_key if routing_key is not None else method.routing_key,
                                            body, headers, pika.BasicProperties(content_type=props.content_type)))
        tag = method.delivery_tag
        fut.add_done_callback(lambda f: self._ack_if_confirmed(f, part, ch, tag))
        return fut

    def _ack_if_confirmed(self, fut: asyncio.Future[None], part: Partition, ch: Channel, tag: int) -> None:
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is None:
            self._ack(part, ch, tag)
        elif not isinstance(exc, ChannelGone):
            log.error("republish failed: %s", exc, extra={"worker": self.index})
            self._return_later(part, ch, tag)

    def _return_later(self, part: Partition, ch: Channel, tag: int) -> None:
        """A delivery we could not settle (the broker refused its retry or parked copy): put it
        back in its queue after ``SETTLE_RETRY_S``, never ack it, never leave it stuck with us."""
        log.error("returning the delivery to %s in %.0fs; the broker keeps it meanwhile", part.queue,
                  SETTLE_RETRY_S, extra={"worker": self.index, "controller": part.ctl.name})

        def back() -> None:
            if ch is part.ch and ch.is_open:
                part.acks.forget(tag)
                part.unacked -= 1
                ch.raw.basic_nack(tag, multiple=False, requeue=True)
        assert self._loop is not None
        self._loop.call_later(SETTLE_RETRY_S, back)

    def _park_raw(self, ch: Channel, part: Partition, method: Any, props: Any, body: bytes,
                  reason: str, error: str) -> asyncio.Future[None]:
        """Park a delivery that never reached a reconcile (see ``_parked_copy``)."""
        headers = self._parked_copy(part, method.routing_key, props.headers, reason, error)
        return self._forward(part, ch, method, props, body, "", headers, routing_key=part.ctl.names.parked)

    def _parked_copy(self, part: Partition, key: str, headers: dict[str, Any] | None, reason: str,
                     error: str) -> dict[str, Any]:
        """The one parking path: count it, log it, and the headers of the copy that goes to
        ``ctl.C.parked`` via the default exchange (the routing key is the queue's name, so the
        item key travels in a header). The caller publishes it and acks on confirm."""
        self.stats.parked[reason] = self.stats.parked.get(reason, 0) + 1
        self.metrics.parked(part.ctl.name, reason)
        log.warning("parking event: %s: %s", reason, error[:300],
                    extra={"worker": self.index, "controller": part.ctl.name, "key": key})
        out = codec.clean_headers(headers)
        out.update({codec.H_KEY: key, codec.H_REASON: reason, codec.H_ERROR: codec.truncate_error(error),
                    codec.H_PARKED_FROM: part.queue, codec.H_PARKED_MS: int(self.wall() * 1000)})
        return out

    def _timed(self, fut: asyncio.Future[None]) -> asyncio.Future[None]:
        """Observe how long the broker takes to confirm this publish."""
        sent = self.clock()

        def confirmed(f: asyncio.Future[None]) -> None:
            if not f.cancelled() and f.exception() is None:
                self.metrics.confirmed(self.clock() - sent)
        fut.add_done_callback(confirmed)
        return fut

    def _sample_metrics(self, m: WorkerMetrics) -> None:
        """Gauges, read when a metrics snapshot is taken: keys waiting and partitions held, per controller."""
        depth = [0] * len(self.ctls)
        for ci, _key in self._wq.ready_keys():
            depth[ci] += 1
        owned = [0] * len(self.ctls)
        for part in self._parts.values():
            if part.ch is not None and not part.releasing:
                owned[part.ctl.index] += 1
        for c in self.ctls:
            m.depth(c.name, depth[c.index])
            m.owned(c.name, owned[c.index])

    def _reroute_delivery(self, d: Delivery) -> asyncio.Future[None]:
        headers = codec.clean_headers(d.headers)
        if d.redeliveries:
            headers[codec.H_REDELIVERIES] = d.redeliveries
        return self._publish_then_ack([d], d.part.ctl.exchange, d.key, d.body, headers, d.content_type)

    # ---------------------------------------------------------------- reconciles

    def _pump(self) -> None:
        # (no lease check here: every reconcile checks it before its first step, see _reconcile)
        if not self._connected:
            return
        wq = self._wq
        while self._inflight < self._concurrency:
            got = wq.get()
            if got is None:
                return
            (ci, key), items = got
            self._inflight += 1
            now = self.clock()
            ctl = self.ctls[ci]
            self.metrics.started(ctl.name, now - items[0].queued_at, len(items) - 1)
            for d in items:
                part = d.part
                part.dispatched += 1
                part.idle.clear()
            # first step at once: a reconcile with nothing to await finishes inside this callback
            task = eager.start(self._loop, self._reconcile(ctl, key, items, now))  # type: ignore[arg-type]
            self._tasks[task] = now + self._timeout_s
            task.add_done_callback(self._forget_task)

    def _forget_task(self, task: asyncio.Task[None]) -> None:
        del self._tasks[task]
        self._timed_out.discard(task)

    def _expire_reconciles(self) -> None:
        """Cancel reconciles past their deadline (checked every heartbeat interval: a per-task
        ``asyncio.timeout`` costs more than the rest of the dispatch; the default timeout is 300 s)."""
        now = self.clock()
        for task, deadline in self._tasks.items():
            if now > deadline and task not in self._timed_out:
                self._timed_out.add(task)
                task.cancel()

    async def _reconcile(self, ctl: _Ctl, key: str, items: list[Delivery], started: float) -> None:
        last = items[-1]
        attempt = max(d.attempt for d in items) if len(items) > 1 else last.attempt
        ctx = Context(self, ctl.name, key, attempt, len(items) - 1, last.part.index)
        self.stats.reconciles += 1
        thread_fut: asyncio.Future[Any] | None = None
        ran_s = 0.0  # the reconcile call and the confirms of what it published
        result: str | None = None  # a controller-runtime result label, once settled
        # in the journal while the controller holds the event: if this process dies now, it is to blame
        slot = self._journal.enter(key, last.body, last.redeliveries) if self._journal else -1
        try:
            try:
                if ctl.is_async:
                    finished, produced = first_step(ctl.controller.reconcile(key, last.event, ctx), self._lease,
                                                    self._slow_step, ctl.name, key)
                    if not finished:
                        produced = await produced
                else:
                    self.check_lease()  # its thread has no step driver: check before it starts
                    thread_fut = self._loop.run_in_executor(  # type: ignore[union-attr]
                        self._threads, ctl.controller.reconcile, key, last.event, ctx)
                    produced = await asyncio.shield(thread_fut)
                if ctx._confirms:
                    await self._wait_confirms(ctx)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task not in self._timed_out:
                    raise  # connection lost, fenced or shutting down
                task.uncancel()  # type: ignore[union-attr]  # handled: settle it as a failure
                produced = TimeoutError()
            except ChannelGone:
                raise
            except BaseException as exc:  # noqa: BLE001 - SystemExit, KeyboardInterrupt... fail this reconcile, not the worker
                produced = exc
            ran_s = self.clock() - started
            decision = outcome.ACK if produced is None else outcome.decide(
                produced, policy=ctl.controller.retry, attempt=attempt, timeout_s=self._timeout_s, rand=self.rand)
            if decision is outcome.ACK:  # the common case, without another coroutine
                self.stats.succeeded += 1
                self._ack_all(items)
                result = "success"
            else:
                result = await self._settle(ctl, key, items, decision)
        except (asyncio.CancelledError, ChannelGone):
            pass  # connection lost, fenced or shutting down: deliveries go back to the broker unacked
        except Exception as exc:  # noqa: BLE001 - a park/retry publish was refused: the broker keeps the event
            log.error("could not settle the reconcile: %s: %s", type(exc).__name__, exc,
                      extra={"worker": self.index, "controller": ctl.name, "key": key})
            for d in items:
                self._return_later(d.part, d.ch, d.tag)
        finally:
            if thread_fut is not None and not thread_fut.done():
                # a plain-def reconcile cannot be interrupted: keep its key busy until it returns
                await asyncio.wait({thread_fut})
            if self._journal is not None:
                self._journal.leave(slot)
            if result is not None:
                self.metrics.reconciled(ctl.name, result, ran_s,
                                        ran_s if result == "success" else self.clock() - started)
            self._finish(ctl, key, items)

    def _slow_step(self, seconds: float, controller: str, key: str) -> None:
        """The blocked-loop watchdog (``pool.fence``): a step that held the loop names itself."""
        self.metrics.loop_blocked(controller)
        log.warning("a reconcile step held the event loop for %.1fs (every other key of this worker waited, "
                    "and heartbeats stopped); use a plain def reconcile or run_in_executor for blocking calls",
                    seconds, extra={"worker": self.index, "controller": controller, "key": key})

    def _finish(self, ctl: _Ctl, key: str, items: list[Delivery]) -> None:
        self._wq.done((ctl.index, key), len(items))
        self._inflight -= 1
        for d in items:
            part = d.part
            part.dispatched -= 1
            if part.dispatched == 0:
                part.idle.set()
        self._pump()

    async def _wait_confirms(self, ctx: Context) -> None:
        futs = [f if isinstance(f, asyncio.Future) else asyncio.wrap_future(f) for f in ctx._confirms]
        results = await asyncio.gather(*futs, return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r

    def _ack_all(self, items: list[Delivery]) -> None:
        for d in items:
            self._ack(d.part, d.ch, d.tag)

    def _ack(self, part: Partition, ch: Channel, tag: int) -> None:
        """Ack at the end of this loop iteration, coalesced with the channel's other acks (``AckBatch``)."""
        if ch is not part.ch or not ch.is_open:
            return  # the channel is gone; the broker has put the delivery back
        part.unacked -= 1
        if part.acks.done(tag):
            self._ack_parts.append(part)
            if len(self._ack_parts) == 1:
                self._loop.call_soon(self._flush_acks)  # type: ignore[union-attr]

    def _flush_acks(self) -> None:
        parts, self._ack_parts = self._ack_parts, []
        for part in parts:
            ch = part.ch
            frames = part.acks.flush()
            if ch is not None and ch.is_open:
                for tag, multiple in frames:
                    ch.raw.basic_ack(tag, multiple)

    def _publish_then_ack(self, items: list[Delivery], exchange: str, key: str, body: bytes,
                          headers: dict[str, Any], content_type: str | None) -> asyncio.Future[None]:
        assert self._pub is not None
        fut = self._timed(self._pub.publish(exchange, key, body, headers, pika.BasicProperties(content_type=content_type)))

        def done(f: asyncio.Future[None]) -> None:  # a failure is the awaiting caller's to handle
            if not f.cancelled() and f.exception() is None:
                self._ack_all(items)
        fut.add_done_callback(done)
        return fut

    async def _settle_delay(self, ctl: _Ctl, key: str, items: list[Delivery], delay_s: float, attempt: int) -> None:
        """Send the latest event through the delay tiers, then ack every covered delivery."""
        last = items[-1]
        headers = codec.clean_headers(last.headers)
        headers.pop(codec.H_REDELIVERIES, None)
        headers[codec.H_ATTEMPT] = attempt
        exchange = self._delay_via(ctl, delay_s, headers)
        await self._publish_then_ack(items, exchange, key, last.body, headers, last.content_type)

    async def _settle(self, ctl: _Ctl, key: str, items: list[Delivery], decision: outcome.Decision) -> str:
        """Carry out ``decision`` (``pool.outcome``); returns controller-runtime's result label."""
        if isinstance(decision, outcome.Ack):
            self.stats.succeeded += 1
            self._ack_all(items)
            return "success"
        if isinstance(decision, outcome.Park):
            if decision.reason != codec.PARK_PERMANENT:
                self.stats.failed += 1
            await self._settle_park(ctl, items, decision.reason, decision.error)
            return "error"
        if not decision.error:
            self.stats.requeued += 1
            await self._settle_delay(ctl, key, items, decision.seconds, 0)
            return "requeue_after"
        self.stats.failed += 1
        self.metrics.retried(ctl.name)
        log.warning("reconcile failed (attempt %d), retrying in %.1fs: %s", decision.attempt, decision.seconds,
                    decision.error[:300], extra={"worker": self.index, "controller": ctl.name, "key": key,
                                                 "attempt": decision.attempt})
        await self._settle_delay(ctl, key, items, decision.seconds, decision.attempt)
        return "error"

    async def _settle_park(self, ctl: _Ctl, items: list[Delivery], reason: str, error: str) -> None:
        """Park the latest event of a reconcile and ack every delivery it covered."""
        last = items[-1]
        headers = self._parked_copy(last.part, last.key, last.headers, reason, error)
        await self._publish_then_ack(items, "", ctl.names.parked, last.body, headers, last.content_type)

    # ---------------------------------------------------------------- ctx.publish

    def check_lease(self) -> None:
        """``Context.check``: raise ``Fenced`` once the lease is lost (from the loop or a reconcile thread)."""
        if not self._lease.valid():
            raise Fenced(self._lease.why)

    def emit(self, ctx: Context, controller: str, key: str, payload: Any) -> Any:
        """``Context.publish``: from the loop (async reconcile) or from a reconcile thread."""
        self.check_lease()
        body = codec.encode(payload)
        exchange = f"{self.settings.broker.prefix}.{controller}"
        if threading.get_ident() == self._loop_thread:
            fut = self._emit_on_loop(exchange, key, body)
            ctx._confirms.append(fut)
            return fut
        cf: concurrent.futures.Future[None] = concurrent.futures.Future()
        ctx._confirms.append(cf)

        def copy(f: asyncio.Future[None]) -> None:
            exc = None if f.cancelled() else f.exception()
            if f.cancelled():
                cf.cancel()
            elif exc is not None:
                cf.set_exception(exc)
            else:
                cf.set_result(None)

        def start() -> None:
            self._emit_on_loop(exchange, key, body).add_done_callback(copy)
        assert self._loop is not None
        self._loop.call_soon_threadsafe(start)
        return cf

    def _emit_on_loop(self, exchange: str, key: str, body: bytes) -> asyncio.Future[None]:
        headers = {codec.H_FIRST_MS: int(self.wall() * 1000)}
        if exchange in self._known_exchanges:
            if self._pub is None:
                f: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                f.set_exception(ChannelGone(0, "not connected"))
                return f
            return self._timed(self._pub.publish(exchange, key, body, headers))
        return asyncio.ensure_future(self._emit_checked(exchange, key, body, headers))

    async def _emit_checked(self, exchange: str, key: str, body: bytes, headers: dict[str, Any]) -> None:
        """Publishing to a missing exchange would close our publish channel (404): check it once first."""
        assert self._consume_conn is not None
        if not await self._consume_conn.exists("exchange", exchange):
            raise BrokerError(f"ctx.publish: exchange {exchange} does not exist (unknown controller?)")
        self._known_exchanges.add(exchange)
        assert self._pub is not None
        await self._timed(self._pub.publish(exchange, key, body, headers))


