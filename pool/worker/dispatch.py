"""Dispatch: the keyed work queue, running reconciles, and what each one's end becomes.

Data flow: ``Intake`` ``add``s each decoded delivery under ``(controller, key)`` in a
``WorkQueue`` (one key is never handed out twice at once; deliveries arriving meanwhile
collapse into one follow-up). ``pump`` starts reconciles while fewer than ``concurrency``
run: an ``async def`` reconcile's first step runs in place (``pool.fence.first_step``) and the
lease is checked before every step; a plain ``def`` runs in the thread pool. When a reconcile
ends, what it published through ``ctx.publish`` is confirmed first, then ``pool.outcome``
decides ack / delay / park and ``Settler`` carries it out: every delivery it covered is acked
only after the confirms. Reconciles past ``--reconcile-timeout-s`` are cancelled by
``expire`` (called every heartbeat interval) and settle as a failure; a cancel for any other
reason (connection lost, fenced, shutting down) leaves their deliveries unacked, for the
broker to give back.

Every reconcile is a ``Run``, and every run is finished exactly once (its slot freed, its key
done in the work queue, its partitions' ``dispatched`` counts returned), however its task
ends: by the coroutine's own ``finally``, or, for a task cancelled before its first step (the
coroutine never ran, so no ``finally`` of it can), by the task's done callback. ``audit`` is the
liveness invariant as data; ``stalled`` is what the worker's watchdog asks every tick.

``Dispatch`` is the ``Runtime`` a ``Context`` talks to (``emit``, ``check_lease``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from .. import codec, eager, outcome
from ..amqp import ChannelGone, Connection
from ..controller import Context
from ..errors import BrokerError
from ..fence import Fenced, Lease, Steps, first_step
from ..journal import Journal
from ..metrics import WorkerMetrics
from ..workqueue import WorkQueue
from .parts import Ctl, Delivery, Partition, WorkerStats
from .settle import Settler

log = logging.getLogger("ctlpool.worker")

Key = tuple[int, str]  # (controller index, item key)


class Run:
    """One reconcile: what it covers, until when it may run, and whether it is finished."""

    __slots__ = ("ctl", "key", "items", "started", "deadline", "timed_out", "finished")

    def __init__(self, ctl: Ctl, key: str, items: list[Delivery], started: float, deadline: float) -> None:
        self.ctl = ctl
        self.key = key
        self.items = items
        self.started = started
        self.deadline = deadline
        self.timed_out = False  # cancelled by ``expire``: settles as a failure
        self.finished = False


@dataclass(frozen=True, slots=True)
class Audit:
    """The liveness invariant as data: all zero/empty at the end of a session, and whenever
    ``runs`` is zero."""

    runs: int
    """Reconcile tasks not yet finished."""
    slots: int
    """Concurrency slots taken (must equal ``runs``)."""
    ready: int
    """Keys waiting for a slot."""
    processing: int
    """Keys handed out (must equal ``runs``)."""
    orphans: tuple[str, ...]
    """Keys processing with no run (a few, for the log): work no one will ever finish."""
    dispatched: int
    """Deliveries counted inside reconciles over the partitions (must equal the runs' deliveries)."""
    covered: int
    """Deliveries the runs cover."""

    @property
    def leaked(self) -> bool:
        """Bookkeeping that no running reconcile accounts for."""
        return (self.slots != self.runs or self.processing != self.runs or bool(self.orphans)
                or self.dispatched != self.covered)


STALL_TICKS = 3  # ticks in a row a worker may hold startable work without starting any


class Dispatch:
    def __init__(self, *, loop: asyncio.AbstractEventLoop, ctls: list[Ctl], settler: Settler, stats: WorkerStats,
                 metrics: WorkerMetrics, concurrency: int, timeout_s: float, max_deliveries: int, prefix: str,
                 clock: Callable[[], float], rand: Callable[[], float], worker: int) -> None:
        self._loop = loop
        self._loop_thread = threading.get_ident()
        self._ctls = ctls
        self._settler = settler
        self._stats = stats
        self._metrics = metrics
        self._concurrency = concurrency
        self._timeout_s = timeout_s
        self._max_deliveries = max_deliveries
        self._prefix = prefix
        self._clock = clock
        self._rand = rand
        self._worker = worker
        self.running = False  # a session is serving: start reconciles
        self.lease = Lease(clock, float("inf"))  # the session's (pool.fence)
        self.steps = Steps(self._slow_step)  # the step now running (pool.blocker watches it)
        self.conn: Connection | None = None  # the session's consume connection (for ctx.publish's exchange check)
        self.journal: Journal | None = None
        self._known_exchanges = {c.exchange for c in ctls}
        self._wq: WorkQueue[Key, Delivery] = WorkQueue()
        self._inflight = 0  # slots taken: one per unfinished run
        self._runs: dict[asyncio.Task[None], Run] = {}
        self._threads = concurrent.futures.ThreadPoolExecutor(max_workers=concurrency,
                                                              thread_name_prefix="reconcile")
        self._stuck_ticks = 0

    # ---------------------------------------------------------------- the work queue

    def add(self, d: Delivery) -> None:
        self._wq.add((d.part.ctl.index, d.key), d)
        self._metrics.added(d.part.ctl.name)
        if self._inflight < self._concurrency:
            self.pump()

    def withdraw(self, part: Partition) -> list[Delivery]:
        """Take the deliveries of ``part`` still waiting for a reconcile out of the queue (a release)."""
        return self._wq.remove_where(lambda d: d.part is part)

    def waiting_keys(self) -> list[int]:
        """Keys waiting for a reconcile, per controller index."""
        depth = [0] * len(self._ctls)
        for ci, _key in self._wq.ready_keys():
            depth[ci] += 1
        return depth

    @property
    def in_flight(self) -> int:
        return len(self._runs)

    def pump(self) -> None:
        # (no lease check here: every reconcile checks it before its first step, see _reconcile)
        if not self.running:
            return
        wq = self._wq
        while self._inflight < self._concurrency:
            got = wq.get()
            if got is None:
                return
            (ci, key), items = got
            self._inflight += 1
            now = self._clock()
            ctl = self._ctls[ci]
            self._metrics.started(ctl.name, now - items[0].queued_at, len(items) - 1)
            for d in items:
                part = d.part
                part.dispatched += 1
                part.idle.clear()
            run = Run(ctl, key, items, now, now + self._timeout_s)
            # first step at once: a reconcile with nothing to await finishes inside this callback
            task = eager.start(self._loop, self._reconcile(run))  # type: ignore[arg-type]
            if not run.finished:
                self._runs[task] = run
                task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        """A reconcile task is done: finish its run if the coroutine never could (cancelled before
        its first step, which only happens to a task queued by ``loop.create_task``)."""
        run = self._runs.pop(task)
        if not run.finished:
            self._finish(run)

    def expire(self) -> None:
        """Cancel reconciles past their deadline (checked every heartbeat interval: a per-task
        ``asyncio.timeout`` costs more than the rest of the dispatch; the default timeout is 300 s)."""
        now = self._clock()
        for task, run in self._runs.items():
            if now > run.deadline and not run.timed_out:
                run.timed_out = True
                task.cancel()

    def cancel_all(self) -> list[asyncio.Task[None]]:
        """The session ends: drop what waits, cancel what runs (their deliveries go back with the
        connection); returns the cancelled reconciles, for the caller to await."""
        self.running = False
        self._wq.remove_where(lambda d: True)
        tasks = list(self._runs)
        for t in tasks:
            t.cancel()
        return tasks

    def close(self) -> None:
        self._threads.shutdown(wait=True)

    # ---------------------------------------------------------------- liveness

    def audit(self, parts: Iterable[Partition]) -> Audit:
        """The bookkeeping against the reconciles that really run (``Audit``); ``parts``: every
        partition the worker holds (their ``dispatched`` counts are checked too)."""
        runs = [r for r in self._runs.values() if not r.finished]
        processing = self._wq.processing()
        orphans = sorted(key for _ci, key in processing - {(r.ctl.index, r.key) for r in runs})
        return Audit(runs=len(runs), slots=self._inflight, ready=len(self._wq), processing=len(processing),
                     orphans=tuple(orphans[:5]), dispatched=sum(p.dispatched for p in parts),
                     covered=sum(len(r.items) for r in runs))

    def stalled(self, parts: Iterable[Partition]) -> Audit | None:
        """Called every tick: the audit, when for ``STALL_TICKS`` ticks in a row the worker held work
        no reconcile will ever start (bookkeeping no run accounts for, or a key waiting while a slot
        is free: ``pump`` starts one the moment either happens, so neither may last)."""
        a = self.audit(parts)
        if not (self.running and (a.leaked or (a.ready and a.runs < self._concurrency))):
            self._stuck_ticks = 0
            return None
        self._stuck_ticks += 1
        return a if self._stuck_ticks >= STALL_TICKS else None

    # ---------------------------------------------------------------- one reconcile

    async def _reconcile(self, run: Run) -> None:
        ctl, key, items = run.ctl, run.key, run.items
        last = items[-1]
        attempt = max(d.attempt for d in items) if len(items) > 1 else last.attempt
        ctx = Context(self, ctl.name, key, attempt, len(items) - 1, last.part.index)
        self._stats.reconciles += 1
        thread_fut: asyncio.Future[Any] | None = None
        ran_s = 0.0  # the reconcile call and the confirms of what it published
        result: str | None = None  # a controller-runtime result label, once settled
        # in the journal while the controller holds the event: if this process dies now, it is to blame
        slot = self.journal.enter(key, last.body, last.redeliveries) if self.journal else -1
        try:
            try:
                if ctl.is_async:
                    finished, produced = first_step(ctl.controller.reconcile(key, last.event, ctx), self.lease,
                                                    self.steps, ctl.name, key)
                    if not finished:
                        produced = await produced
                else:
                    self.check_lease()  # its thread has no step driver: check before it starts
                    thread_fut = self._loop.run_in_executor(self._threads, ctl.controller.reconcile, key,
                                                            last.event, ctx)
                    produced = await asyncio.shield(thread_fut)
                if ctx._confirms:
                    await _confirmed(ctx)
            except asyncio.CancelledError:
                if not run.timed_out:
                    raise  # connection lost, fenced or shutting down
                asyncio.current_task().uncancel()  # type: ignore[union-attr]  # handled: settle it as a failure
                produced = TimeoutError()
            except (ChannelGone, GeneratorExit):
                raise  # the session's, or the coroutine being closed
            except BaseException as exc:  # noqa: BLE001 - SystemExit, KeyboardInterrupt... fail this reconcile, not the worker
                produced = exc
            ran_s = self._clock() - run.started
            decision = outcome.ACK if produced is None else outcome.decide(
                produced, policy=ctl.controller.retry, attempt=attempt, timeout_s=self._timeout_s, rand=self._rand,
                deaths=max(d.redeliveries for d in items), max_deliveries=self._max_deliveries)
            if decision is outcome.ACK:  # the common case, without another coroutine
                self._stats.succeeded += 1
                self._settler.ack_all(items)
                result = "success"
            else:
                result = await self._settler.settle(ctl, key, items, decision)
        except (asyncio.CancelledError, ChannelGone) as exc:
            if isinstance(exc, asyncio.CancelledError) and run.timed_out and self.running:
                # its deadline passed while its retry or park waited for a confirm: give the event back
                asyncio.current_task().uncancel()  # type: ignore[union-attr]
                for d in items:
                    self._settler.return_later(d.part, d.ch, d.tag)
            # else: connection lost, fenced or shutting down: deliveries go back to the broker unacked
        except Exception as exc:  # noqa: BLE001 - a park/retry publish was refused: the broker keeps the event
            log.error("could not settle the reconcile: %s: %s", type(exc).__name__, exc,
                      extra={"worker": self._worker, "controller": ctl.name, "key": key})
            for d in items:
                self._settler.return_later(d.part, d.ch, d.tag)
        finally:
            if thread_fut is not None and not thread_fut.done():
                # a plain-def reconcile cannot be interrupted: keep its key busy until it returns
                await asyncio.wait({thread_fut})
            if self.journal is not None:
                self.journal.leave(slot)
            if result is not None:
                self._metrics.reconciled(ctl.name, result, ran_s,
                                         ran_s if result == "success" else self._clock() - run.started)
            self._finish(run)

    def _finish(self, run: Run) -> None:
        """The one end of every run (see the module docstring); a second call does nothing."""
        if run.finished:
            return
        run.finished = True
        self._wq.done((run.ctl.index, run.key), len(run.items))
        self._inflight -= 1
        for d in run.items:
            part = d.part
            part.dispatched -= 1
            if part.dispatched == 0:
                part.idle.set()
        self.pump()

    def _slow_step(self, seconds: float, controller: str, key: str) -> None:
        """A step that held the loop names itself (``pool.fence``)."""
        self._metrics.loop_blocked(controller)
        log.warning("a reconcile step held the event loop for %.1fs (every other key of this worker waited, "
                    "and heartbeats stopped); use a plain def reconcile or run_in_executor for blocking calls",
                    seconds, extra={"worker": self._worker, "controller": controller, "key": key})

    # ---------------------------------------------------------------- Runtime (what a Context calls)

    def check_lease(self) -> None:
        """``Context.check``: raise ``Fenced`` once the lease is lost (from the loop or a reconcile thread)."""
        if not self.lease.valid():
            raise Fenced(self.lease.why)

    def emit(self, ctx: Context, controller: str, key: str, payload: Any) -> Any:
        """``Context.publish``: from the loop (async reconcile) or from a reconcile thread."""
        self.check_lease()
        body = codec.encode(payload)
        exchange = f"{self._prefix}.{controller}"
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
        self._loop.call_soon_threadsafe(start)
        return cf

    def _emit_on_loop(self, exchange: str, key: str, body: bytes) -> asyncio.Future[None]:
        headers = {codec.H_FIRST_MS: int(self._settler.wall() * 1000)}
        if exchange in self._known_exchanges:
            return self._settler.publish(exchange, key, body, headers)
        return asyncio.ensure_future(self._emit_checked(exchange, key, body, headers))

    async def _emit_checked(self, exchange: str, key: str, body: bytes, headers: dict[str, Any]) -> None:
        """Publishing to a missing exchange would close our publish channel (404): check it once first."""
        if self.conn is None:
            raise ChannelGone(0, "not connected")
        if not await self.conn.exists("exchange", exchange):
            raise BrokerError(f"ctx.publish: exchange {exchange} does not exist (unknown controller?)")
        self._known_exchanges.add(exchange)
        await self._settler.publish(exchange, key, body, headers)


async def _confirmed(ctx: Context) -> None:
    """Wait for the confirms of everything the reconcile published; raise the first failure."""
    futs = [f if isinstance(f, asyncio.Future) else asyncio.wrap_future(f) for f in ctx._confirms]
    results = await asyncio.gather(*futs, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
