"""One worker process's life: sessions with the broker, one after another, until it drains.

Data flow: ``run`` takes the slot's journal (blaming what the previous process died holding),
then loops: open a ``Session``; listen ``SETTLE_INTERVALS`` heartbeat intervals for peers;
let ``Ownership`` acquire this member's partitions; report READY; serve until ``request_stop``
(drain: hand every partition over) or until the session is lost (connection, channel, lease),
then tear it down (cancel in-flight reconciles, whose deliveries go back to the broker with
the connection) and reconnect after ``Backoff``'s delay. A membership tick every heartbeat
interval announces us, expires reconciles past their timeout, rebalances, and watches liveness:
the age of the oldest unacked delivery (a gauge, and in the heartbeat for ``ctlpool status``),
and ``Dispatch.stalled`` — work held that no reconcile will ever start is logged as one ERROR
and ends the session; if the teardown still leaves bookkeeping no reconcile accounts for, the
process exits ``EXIT_STALLED`` for the supervisor to start a fresh one. A reconcile step that
blocks the loop is interrupted before the lease runs out (``pool.blocker``).

``Follow`` reads each controller's live layout (``pool.layout``) at the start of every session
and whenever a resize says so, and ``Ownership`` acts on it: the partition count is the
broker's, not ``--partitions``'s.

Deliveries flow one way through the rooms built here:
``Ownership`` (a partition's channel) -> ``Intake`` -> ``Dispatch`` -> ``Settler`` (acks, republishes).
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from typing import Callable

from .. import blocker, journal
from ..amqp import ChannelGone, Connection
from ..controller import Controller
from ..errors import BrokerError
from ..exits import EXIT_CONFIG, EXIT_OK, EXIT_STALLED
from ..messages import WorkerState
from ..metrics import WorkerMetrics
from ..settings import PoolSettings
from ..urls import redact_url, split_urls
from .dispatch import Dispatch
from .follow import Follow
from .guard import Guard
from .intake import Intake
from .ownership import Ownership
from .parts import Ctl, WorkerStats
from .roster import SETTLE_INTERVALS
from .session import Backoff, Session
from .settle import Settler

log = logging.getLogger("ctlpool.worker")


class Worker:
    """See the module docstring. ``run()`` returns when drained (or on ``request_stop``)."""

    def __init__(self, *, settings: PoolSettings, controllers: list[Controller], index: int = 0,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
                 rand: Callable[[], float] = random.random, on_state: Callable[[WorkerState], None] | None = None,
                 metrics: WorkerMetrics | None = None, journal: journal.Store | None = None,
                 pool_started: float | None = None) -> None:
        self.settings = settings
        self.index = index
        self.member_id = f"{settings.node_id}/{index}"
        self.clock = clock
        self.wall = wall
        self.rand = rand
        self.on_state = on_state or (lambda state: None)
        self.ctls = [Ctl(i, c, settings.broker.prefix, settings.topology.partitions) for i, c in enumerate(controllers)]
        self.stats = WorkerStats()
        self.metrics = metrics if metrics is not None else WorkerMetrics()
        self.metrics.sampler = self._sample_metrics
        self.journal_store = journal  # the slot's (the supervisor's); None: no crash attribution
        self._stop = asyncio.Event()
        self._started = wall()
        self.pool_started = pool_started if pool_started is not None else self._started
        self._session: Session | None = None
        self._conns: list[Connection] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._dispatch: Dispatch | None = None
        self._ownership: Ownership | None = None
        self._follow: Follow | None = None
        self._served = False  # the current session got as far as consuming
        self.exit_code = EXIT_OK  # EXIT_STALLED: the process must be replaced (see the module docstring)

    def _build(self, loop: asyncio.AbstractEventLoop) -> tuple[Settler, Intake, Dispatch, Ownership]:
        """The rooms, wired so deliveries flow one way (see the module docstring)."""
        s, w = self.settings, self.index
        settler = Settler(loop=loop, stats=self.stats, metrics=self.metrics, tiers=s.topology.tiers_s,
                          clock=self.clock, wall=self.wall, worker=w)
        dispatch = Dispatch(loop=loop, ctls=self.ctls, settler=settler, stats=self.stats, metrics=self.metrics,
                            concurrency=s.worker.concurrency, timeout_s=s.worker.reconcile_timeout_s,
                            max_deliveries=s.topology.max_deliveries, prefix=s.broker.prefix, clock=self.clock,
                            rand=self.rand, worker=w)
        guard = Guard(settler=settler, stats=self.stats, metrics=self.metrics, clock=self.clock, worker=w)
        intake = Intake(settler=settler, guard=guard, stats=self.stats, dispatch=dispatch.add,
                        max_deliveries=s.topology.max_deliveries, clock=self.clock, worker=w)
        ownership = Ownership(settings=s, ctls=self.ctls, member_id=self.member_id, worker=w, started=self._started,
                              intake=intake, guard=guard, dispatch=dispatch, settler=settler, stats=self.stats,
                              metrics=self.metrics, clock=self.clock, since=self.pool_started,
                              on_duplicate=self._duplicate)
        self._follow = Follow(ctls=self.ctls, clock=self.clock, worker=w, on_change=ownership.rebalance,
                              settings=s, designated=ownership.designated)
        ownership.roster.on_layout = self._follow.on_notice
        return settler, intake, dispatch, ownership

    def request_stop(self) -> None:
        """Drain: stop dispatching, finish in-flight reconciles, release, exit ``run``."""
        self._stop.set()

    async def run(self) -> None:
        self._loop = loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        settler, intake, dispatch, ownership = self._build(loop)
        self._dispatch, self._ownership = dispatch, ownership
        dispatch.journal = self._open_journal(intake)
        for c in self.ctls:
            c.controller.setup()
        watchdog = blocker.watch(dispatch.steps, lambda: dispatch.lease, self.clock)
        backoff = Backoff(self.settings.broker.reconnect_max_s, self.rand,
                          len(split_urls(self.settings.broker.amqp_url)))
        while not self._stop.is_set():
            self._served = False
            try:
                await self._serve(settler, dispatch, ownership, intake)
            except (BrokerError, ChannelGone, OSError) as exc:
                log.warning("broker session failed: %s", exc, extra={"worker": self.index})
            finally:
                await self._teardown(settler, dispatch, ownership)
            if self._stop.is_set():
                break
            delay = backoff.after(self._served)
            log.info("reconnecting in %.1fs to %s", delay, redact_url(self.settings.broker.amqp_url),
                     extra={"worker": self.index})
            self.on_state(WorkerState.RECONNECTING)
            await self._sleep(delay)
        if watchdog is not None:
            watchdog.stop()
        dispatch.close()
        if dispatch.journal is not None:
            dispatch.journal.close()
        self.on_state(WorkerState.STOPPED)

    def _open_journal(self, intake: Intake) -> journal.Journal | None:
        """Take the blame the slot's previous process left (``pool.journal``) and start afresh."""
        if self.journal_store is None:
            return None
        jrnl, leftover = journal.Journal.take_leftover(self.journal_store)
        if leftover:
            log.warning("the previous worker %d died inside %d reconcile(s); each of those events counts one "
                        "more delivery toward --max-deliveries when it comes back", self.index, len(leftover),
                        extra={"worker": self.index})
            intake.blame(leftover)
        return jrnl

    async def _serve(self, settler: Settler, dispatch: Dispatch, ownership: Ownership, intake: Intake) -> None:
        """One session: connect, join, acquire, serve until stop (drain) or loss (raises)."""
        session = await Session.open(self.settings.broker, self.member_id, on_heartbeat=ownership.roster.on_heartbeat,
                                     on_lease_lost=self._fence, clock=self.clock, opened=self._conns)
        self._session = session
        settler.pub = session.pub
        dispatch.conn, dispatch.lease, dispatch.running = session.consume, session.lease, True
        ownership.bind(session)
        follow = self._follow
        assert follow is not None
        follow.conn = session.consume
        await follow.read_all()  # each controller's live partition count, before taking any partition
        ownership.heartbeat()
        ticker = asyncio.ensure_future(self._tick(ownership, dispatch, intake))
        try:
            # Listen before taking anything: peers already running announce themselves within an
            # interval, so a newcomer doesn't grab the whole controller and hand most of it back.
            await self._sleep(SETTLE_INTERVALS * self.settings.worker.heartbeat_interval_s)
            if not self._stop.is_set():
                ownership.joined = True
                ownership.rebalance()
                await ownership.settled(self._stop)
                if session.lost.done():
                    raise session.lost.result()
                log.info("member %s consuming %d partitions (%d members)", self.member_id, ownership.active_count(),
                         len(ownership.roster.live()), extra={"worker": self.index})
                self.on_state(WorkerState.READY)
                self._served = True  # the next outage starts its backoff afresh
            await session.until_lost(self._stop)
        finally:
            ticker.cancel()
        self.on_state(WorkerState.DRAINING)
        await ownership.drain()

    async def _tick(self, ownership: Ownership, dispatch: Dispatch, intake: Intake) -> None:
        interval = self.settings.worker.heartbeat_interval_s
        while True:
            await asyncio.sleep(interval)
            ownership.heartbeat()
            if self._session is not None:
                self._session.probe()  # a node gone silent fences us once the lease runs out
                self._session.check_confirms(self.clock())
            dispatch.expire()
            intake.forget_blame()
            ownership.tick()
            if self._follow is not None:
                self._follow.tick()
            self._watch_liveness(dispatch, ownership)

    def _watch_liveness(self, dispatch: Dispatch, ownership: Ownership) -> None:
        """Every tick (after ``Ownership.tick``): a stalled worker starts over."""
        parts = list(ownership.parts.values())
        stuck = dispatch.stalled(parts)
        if stuck is None or self._session is None:
            return
        held = sum(p.unacked for p in parts)
        log.error("stalled: holding %d unacked deliveries (oldest %.0fs) with %d of %d reconcile slots running; "
                  "%d keys waiting, %d processing, orphaned keys %s, slots taken %d; starting a fresh session",
                  held, ownership.oldest_unacked_s, stuck.runs, self.settings.worker.concurrency, stuck.ready,
                  stuck.processing, list(stuck.orphans), stuck.slots, extra={"worker": self.index})
        self.metrics.stalled()
        self._session.lose("stalled: work held that no reconcile will start")

    def _duplicate(self, why: str) -> None:
        """Another pool's member has our id and was there first: stop, and make the pool stop."""
        if self.exit_code != EXIT_CONFIG:
            log.error("%s; stopping", why, extra={"worker": self.index})
            self.exit_code = EXIT_CONFIG
            self._stop.set()

    def _fence(self, why: str) -> None:
        """The lease ran out (pool.fence): cancel everything in flight and rejoin, like a connection loss."""
        session = self._session
        if session is None or self._loop is None:
            return
        if threading.get_ident() != self._loop_thread:  # a plain-def reconcile's ctx.check() noticed
            self._loop.call_soon_threadsafe(self._fence, why)
            return
        if session.lost.done():
            return
        in_flight = self._dispatch.in_flight if self._dispatch is not None else 0
        log.warning("fencing: %s; cancelling %d in-flight reconciles and rejoining", why, in_flight,
                    extra={"worker": self.index})
        self.metrics.fenced()
        session.consume.forsake()  # the lease is the consume connection's: reconnect through another node
        session.lose(f"fenced: {why}")

    async def _sleep(self, seconds: float) -> None:
        """Sleep, waking early on stop."""
        try:
            await asyncio.wait_for(self._stop.wait(), seconds)
        except asyncio.TimeoutError:
            pass

    async def _teardown(self, settler: Settler, dispatch: Dispatch, ownership: Ownership) -> None:
        """Cancel in-flight reconciles (their deliveries return with the connection), close everything."""
        ownership.abandon()
        if self._follow is not None:
            self._follow.stop()
        cancelled = dispatch.cancel_all()
        for conn in self._conns:
            conn.close()
        if cancelled:
            await asyncio.gather(*cancelled, return_exceptions=True)
        left = dispatch.audit(())
        if left.leaked or left.runs:
            log.error("after the session ended, %s; this process stops for a fresh one (exit %d)", left,
                      EXIT_STALLED, extra={"worker": self.index})
            self.exit_code = EXIT_STALLED
            self._stop.set()
        self._conns.clear()
        self._session = None
        settler.pub = None
        dispatch.conn = None
        await asyncio.sleep(0)

    def _sample_metrics(self, m: WorkerMetrics) -> None:
        """Gauges, read when a metrics snapshot is taken: keys waiting and partitions held, per controller."""
        depth = self._dispatch.waiting_keys() if self._dispatch is not None else [0] * len(self.ctls)
        owned = [0] * len(self.ctls)
        for part in self._ownership.parts.values() if self._ownership is not None else ():
            if part.active:
                owned[part.ctl.index] += 1
        for c in self.ctls:
            m.depth(c.name, depth[c.index])
            m.owned(c.name, owned[c.index])
            m.layout(c.name, c.partitions, c.resizes)
        m.oldest_unacked(self.index, self._ownership.oldest_unacked_s if self._ownership is not None else 0.0)
