"""Ownership: which partitions this worker holds, taking them and handing them over.

Data flow: the ``Roster`` says who is alive (member heartbeats); ``rebalance`` asks
``assignment.assign`` (pure) which partitions this member should own and, in the
background, ``acquire``s the missing ones and hands the rest over (``hand_over``: on quorum
queues it keeps consuming a partition until the new owner announces it has subscribed behind
it, then ``release``). A member that announces itself but never consumes — a forged heartbeat
on the members exchange, a member whose consumers fail — can't leave partitions unconsumed: a
running one keeps what it should hand to it, and once it has held none of its share for a grace
period (``Roster.idle``) every member leaves it out of the assignment. Acquiring opens a
channel and consumes (single-active-consumer on quorum queues, ``exclusive`` on classic
ones: the broker is the lock); the ``Guard`` measures the ring-drift window first when the
partition isn't known clean. Release and drain never cancel a consumer with work in flight
(DESIGN fact 2): stop dispatching, wait for in-flight reconciles to finish and ack, re-route
the prefetched rest, then close the channel; a release that comes while the partition is still
being acquired waits for the acquisition, which stops short of subscribing (else the channel
opened a moment later would consume for nobody). A partition channel the broker closes while the
connection is fine ends the whole session (``Session.lose``): the well-trodden reconnect path.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

from ..acks import AckBatch
from ..amqp import NOT_FOUND, Channel, ChannelGone
from ..assignment import Member, assign
from ..metrics import WorkerMetrics
from ..settings import PoolSettings
from ..topology import is_clean
from .dispatch import Dispatch
from .guard import Guard
from .intake import Intake
from .parts import Ctl, Partition, WorkerStats
from .roster import Roster
from .session import Session
from .settle import Settler

log = logging.getLogger("ctlpool.worker")

ACQUIRE_RETRY_S = 1.0  # a partition another consumer still holds (classic exclusive) is retried this often
MISSING_LOG_S = 30.0  # a missing partition queue is retried every heartbeat, logged this often
HANDOVER_POLL_S = 0.25  # a partition moving away checks this often whether its new owner has subscribed
HANDOVER_LOG_S = 10.0  # a new owner that has not subscribed this long is named in a WARNING


class Ownership:
    def __init__(self, *, settings: PoolSettings, ctls: list[Ctl], member_id: str, worker: int, started: float,
                 intake: Intake, guard: Guard, dispatch: Dispatch, settler: Settler, stats: WorkerStats,
                 metrics: WorkerMetrics, clock: Callable[[], float], since: float = 0.0,
                 on_duplicate: Callable[[str], None] = lambda why: None) -> None:
        self._settings = settings
        self._ctls = ctls
        self.member_id = member_id
        self._worker = worker
        self._intake = intake
        self._guard = guard
        self._dispatch = dispatch
        self._settler = settler
        self._stats = stats
        self._metrics = metrics
        self._clock = clock
        self._exclusive = settings.topology.queue_type != "quorum"
        self.parts: dict[tuple[int, int], Partition] = {}
        self.roster = Roster(settings=settings, member_id=member_id, worker=worker, started=started, since=since,
                             controllers=tuple(c.name for c in ctls), clock=clock, on_change=self.rebalance,
                             on_duplicate=on_duplicate)
        self.session: Session | None = None
        self.joined = False  # listened for peers; may take partitions
        self._acquiring: set[asyncio.Task[None]] = set()
        self._releasing: set[asyncio.Task[None]] = set()
        self._owners: dict[int, list[str | None]] = {}
        self._idle_said: set[tuple[str, int]] = set()  # controller index -> owner of each partition, as last assigned
        self.oldest_unacked_s = 0.0  # the oldest delivery held and not yet acked, as of the last tick
        self._missing_logged: dict[str, float] = {}  # partition queue -> when we last said it is missing

    def bind(self, session: Session | None) -> None:
        """A new session starts with an empty member table; ``None``: it ended."""
        self.session = session
        self.joined = False
        if session is not None:
            self.roster.reset()

    def active_count(self) -> int:
        return sum(1 for p in self.parts.values() if p.active)

    # ---------------------------------------------------------------- membership

    def heartbeat(self, bye: bool = False) -> None:
        """Announce ourselves and what we hold (not persistent, not confirmed: a lost one is just late)."""
        ch = self.session.heartbeats if self.session is not None else None
        if ch is None or not ch.is_open:
            return
        parts: dict[str, dict[int, int]] = {}
        for part in self.parts.values():
            if part.active:
                parts.setdefault(part.ctl.name, {})[part.index] = part.unacked
        blocked = self.session.publish.blocked  # type: ignore[union-attr]
        self._metrics.broker_blocked(blocked is not None)
        holding = {p.ctl.name for p in self.parts.values()}
        self.roster.announce(ch, parts=parts, blocked=blocked, broker=self.session.consume.address,  # type: ignore[union-attr]
                             oldest_unacked_s=self.oldest_unacked_s, bye=bye,
                             layouts={c.name: c.version for c in self._ctls},
                             paused=tuple(c.name for c in self._ctls if c.paused and c.name not in holding))

    def tick(self) -> None:
        """Every heartbeat interval: how long the oldest unacked delivery waits; forget members
        gone silent; rebalance."""
        now = self._clock()
        self.oldest_unacked_s = max((p.unacked_age(now) for p in self.parts.values()), default=0.0)
        self.roster.expire()
        self.rebalance()

    def rebalance(self) -> None:
        """Acquire partitions this member should own and hand the rest over, in the background; a
        paused controller's partitions are all released (a resize waits for that)."""
        if self.session is None or not self.joined:
            return
        live = self.roster.live()
        for ctl in self._ctls:
            if ctl.paused:
                for part in [p for p in self.parts.values() if p.ctl is ctl and not p.releasing]:
                    self._spawn(self.release(part), self._releasing)
                continue
            members = [Member(hb.id, hb.weight) for hb in live if ctl.name in hb.controllers]
            if not any(m.id == self.member_id for m in members):
                members.append(Member(self.member_id, self._settings.weight))
            owners = assign(members, ctl.name, ctl.partitions)
            idle = self.roster.idle(ctl.name, owners, exclude=self.member_id, not_before=ctl.resumed_at)
            if idle:
                owners = assign([m for m in members if m.id not in idle], ctl.name, ctl.partitions)
            self._owners[ctl.index] = owners
            self._say_idle(ctl, len(members))
            for index, owner in enumerate(owners):
                if owner == self.member_id and (ctl.index, index) not in self.parts:
                    self._spawn(self.acquire(ctl, index), self._acquiring)
            for (ci, index), part in list(self.parts.items()):
                if ci != ctl.index or part.releasing or part.leaving:
                    continue
                if index >= ctl.partitions:
                    self._spawn(self.release(part), self._releasing)  # gone from the layout (a shrink)
                elif owners[index] != self.member_id:
                    move = self.release(part) if self._exclusive else self.hand_over(part)
                    self._spawn(move, self._releasing)

    def designated(self, ctl: Ctl) -> bool:
        """Whether this member is the one to finish a resize of ``ctl`` its driver left: the lowest
        id among the live members that know layouts."""
        ids = [hb.id for hb in self.roster.live() if ctl.name in hb.controllers and ctl.name in hb.layouts]
        return min([*ids, self.member_id]) == self.member_id

    def _say_idle(self, ctl: Ctl, members: int) -> None:
        """Once per count: more members than partitions leaves some with nothing to do."""
        if members > ctl.partitions and (ctl.name, ctl.partitions) not in self._idle_said:
            self._idle_said.add((ctl.name, ctl.partitions))
            log.warning("%d members share the %d partitions of %s: %d of them are idle; to use them all: "
                        "ctlpool topology resize %s --partitions %d", members, ctl.partitions, ctl.name,
                        members - ctl.partitions, ctl.name, members, extra={"worker": self._worker})

    def _spawn(self, coro: Any, bucket: set[asyncio.Task[None]]) -> None:
        task = asyncio.ensure_future(coro)
        bucket.add(task)

        def done(t: asyncio.Task[None]) -> None:
            bucket.discard(t)
            exc = None if t.cancelled() else t.exception()
            if exc is not None and not isinstance(exc, ChannelGone):
                log.error("partition task failed: %s", exc, extra={"worker": self._worker})
        task.add_done_callback(done)

    async def settled(self, stop: asyncio.Event) -> None:
        """Wait until no acquisition is pending (classic partitions a peer still holds are retried)."""
        while self._acquiring and not stop.is_set():
            await asyncio.wait(set(self._acquiring), timeout=1.0)

    # ---------------------------------------------------------------- one partition

    async def acquire(self, ctl: Ctl, index: int) -> None:
        session = self.session
        assert session is not None
        conn = session.consume
        part = Partition(ctl, index, ctl.names.partition(index, ctl.partitions))
        self.parts[(ctl.index, index)] = part
        part.acquiring = asyncio.current_task()
        try:
            await self._acquire(conn, session, part)
        finally:
            part.acquiring = None

    async def _acquire(self, conn: Any, session: Session, part: Partition) -> None:
        ctl, index = part.ctl, part.index
        while not part.releasing:
            ch = await conn.channel()
            await ch.rpc("basic_qos", prefetch_count=self._settings.worker.prefetch)
            part.ch = ch
            part.acks = AckBatch()
            part.guard_left = 0
            # a partition already cleared since the broker (and its ring) last started needs no guard
            part.guarding = (self._settings.worker.reroute_on_acquire
                             and not await is_clean(conn, ctl.names, index, ctl.partitions))
            part.held = [] if part.guarding else None  # hold deliveries until the guard window is known
            part.acquired_at = self._clock()
            if part.releasing:
                return  # released while we were opening it: the release closes the channel, unused
            try:
                # the tag names us: ``rabbitmqctl list_consumers`` shows which member holds a partition
                await ch.consume(part.queue, lambda c, m, pr, b, ch=ch: self._intake.on_message(part, ch, m, pr, b),
                                 exclusive=self._exclusive, consumer_tag=f"ctlpool {self.member_id}")
                part.subscribed = True
                self._stats.acquisitions += 1
                self._metrics.handover(ctl.name, "acquired")
                ch.closed.add_done_callback(
                    lambda f, ch=ch: self._lost(part, ch, session, f"channel closed: {f.result()}"))
                ch.cancelled.add_done_callback(
                    lambda f, ch=ch: self._lost(part, ch, session, "consumer cancelled by the broker"))
                if part.guarding:
                    await self._guard.measure(part, ch, self._intake.on_message)
                return
            except ChannelGone as exc:
                if exc.reply_code == NOT_FOUND:
                    # deleted under us: serve the other partitions; the membership tick tries again
                    self.parts.pop((ctl.index, index), None)
                    self._say_missing(part)
                    return
                # 403: another exclusive consumer (classic) still holds it; try again shortly
                log.info("partition %s busy (%s); retrying", part.queue, exc, extra={"worker": self._worker})
                await asyncio.sleep(ACQUIRE_RETRY_S)

    def _say_missing(self, part: Partition) -> None:
        now = self._clock()
        if now - self._missing_logged.get(part.queue, -1e9) >= MISSING_LOG_S:
            self._missing_logged[part.queue] = now
            log.error("partition queue %s does not exist; run 'ctlpool topology %s' (retrying)", part.queue,
                      part.ctl.name, extra={"worker": self._worker, "partition": part.index,
                                            "controller": part.ctl.name})

    def _lost(self, part: Partition, ch: Channel, session: Session, why: str) -> None:
        """The broker closed a partition's channel or cancelled its consumer, the connection being fine.

        The partition would otherwise stay "owned" with nothing consuming it. Start over the way
        a connection loss does (in-flight reconciles cancelled, every delivery back to the broker,
        reconnect, re-acquire): one well-trodden path keeps G1, where patching up one partition
        while its keys may still be in flight would not."""
        if session.lost.done() or part.ch is not ch or part.releasing or not self.joined or ch.conn.closed.done():
            return  # a release, a drain or a lost connection closed it; or the session is ending anyway
        log.warning("partition %s lost its consumer (%s); reconnecting", part.queue, why,
                    extra={"worker": self._worker, "partition": part.index, "controller": part.ctl.name})
        session.lose(f"partition {part.queue}: {why}")

    def _owner(self, part: Partition) -> str | None:
        owners = self._owners.get(part.ctl.index)
        return owners[part.index] if owners else None

    async def hand_over(self, part: Partition) -> None:
        """Keep consuming ``part`` until its new owner announces it has subscribed (a single-active-
        consumer standby behind us), then ``release`` it; stay if it is ours again meanwhile."""
        part.leaving = True
        since, warned = self._clock(), False
        try:
            while True:
                owner = self._owner(part)
                if part.releasing or owner == self.member_id or not part.subscribed:
                    return  # a drain releases it; or it stays ours
                if owner is not None and self.roster.holds(owner, part.ctl.name, part.index):
                    break
                if not warned and self._clock() - since >= HANDOVER_LOG_S:
                    warned = True
                    log.warning("%s should move to member %s, which has not subscribed to it in %.0fs; keeping it "
                                "meanwhile", part.queue, owner, HANDOVER_LOG_S,
                                extra={"worker": self._worker, "partition": part.index, "controller": part.ctl.name})
                await asyncio.sleep(HANDOVER_POLL_S)
        finally:
            part.leaving = False
        await self.release(part)

    async def release(self, part: Partition) -> None:
        """Stop dispatching, wait for in-flight reconciles, re-route the prefetched rest, close the channel."""
        part.releasing = True
        acquiring = part.acquiring
        if acquiring is not None and acquiring is not asyncio.current_task():
            # let it finish (or stop short of subscribing) first: a release that saw no channel yet
            # would leave the channel opened a moment later consuming, owned by nobody
            await asyncio.wait({acquiring})
        if part.held is None:
            part.held = []
        queued = self._dispatch.withdraw(part)
        await part.idle.wait()
        ch = part.ch
        if ch is not None and ch.is_open:
            confirms = [self._settler.reroute(d) for d in queued if d.ch is ch]
            confirms += self._intake.reroute_held(part, ch)
            if confirms:
                await asyncio.gather(*confirms, return_exceptions=True)
            self._settler.flush_acks()
            await ch.close()
        self.parts.pop((part.ctl.index, part.index), None)
        self._stats.releases += 1
        self._metrics.handover(part.ctl.name, "released")

    # ---------------------------------------------------------------- the end of a session

    async def drain(self) -> None:
        """Hand every partition over: say goodbye first (peers subscribe right away, as standbys
        behind our consumers, so each partition changes hands the moment we close its channel)."""
        self.joined = False  # take nothing more
        self.heartbeat(bye=True)
        for t in list(self._acquiring):
            t.cancel()
        releases = [self.release(p) for p in list(self.parts.values()) if not p.releasing]
        timeout = self._settings.worker.drain_timeout_s
        try:
            await asyncio.wait_for(asyncio.gather(*releases, *self._releasing, return_exceptions=True), timeout)
        except asyncio.TimeoutError:
            log.warning("drain timed out after %.0fs; in-flight deliveries go back to the broker", timeout,
                        extra={"worker": self._worker})

    def abandon(self) -> None:
        """The session is gone: stop every acquisition and release, forget every partition."""
        self.bind(None)
        for t in [*self._acquiring, *self._releasing]:
            t.cancel()
        self.parts.clear()
