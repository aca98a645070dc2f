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

``Dispatch`` is the ``Runtime`` a ``Context`` talks to (``emit``, ``check_lease``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from typing import Any, Callable

from .. import codec, eager, outcome
from ..amqp import ChannelGone, Connection
from ..controller import Context
from ..errors import BrokerError
from ..fence import Fenced, Lease, first_step
from ..journal import Journal
from ..metrics import WorkerMetrics
from ..workqueue import WorkQueue
from .parts import Ctl, Delivery, Partition, WorkerStats
from .settle import Settler

log = logging.getLogger("ctlpool.worker")


class Dispatch:
    def __init__(self, *, loop: asyncio.AbstractEventLoop, ctls: list[Ctl], settler: Settler, stats: WorkerStats,
                 metrics: WorkerMetrics, concurrency: int, timeout_s: float, prefix: str,
                 clock: Callable[[], float], rand: Callable[[], float], worker: int) -> None:
        self._loop = loop
        self._loop_thread = threading.get_ident()
        self._ctls = ctls
        self._settler = settler
        self._stats = stats
        self._metrics = metrics
        self._concurrency = concurrency
        self._timeout_s = timeout_s
        self._prefix = prefix
        self._clock = clock
        self._rand = rand
        self._worker = worker
        self.running = False  # a session is serving: start reconciles
        self.lease = Lease(clock, float("inf"))  # the session's (pool.fence)
        self.conn: Connection | None = None  # the session's consume connection (for ctx.publish's exchange check)
        self.journal: Journal | None = None
        self._known_exchanges = {c.exchange for c in ctls}
        self._wq: WorkQueue[tuple[int, str], Delivery] = WorkQueue()
        self._inflight = 0
        self._tasks: dict[asyncio.Task[None], float] = {}  # running reconciles -> deadline (clock)
        self._timed_out: set[asyncio.Task[None]] = set()
        self._threads = concurrent.futures.ThreadPoolExecutor(max_workers=concurrency,
                                                              thread_name_prefix="reconcile")

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
        return len(self._tasks)

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
            # first step at once: a reconcile with nothing to await finishes inside this callback
            task = eager.start(self._loop, self._reconcile(ctl, key, items, now))  # type: ignore[arg-type]
            self._tasks[task] = now + self._timeout_s
            task.add_done_callback(self._forget_task)

    def _forget_task(self, task: asyncio.Task[None]) -> None:
        del self._tasks[task]
        self._timed_out.discard(task)

    def expire(self) -> None:
        """Cancel reconciles past their deadline (checked every heartbeat interval: a per-task
        ``asyncio.timeout`` costs more than the rest of the dispatch; the default timeout is 300 s)."""
        now = self._clock()
        for task, deadline in self._tasks.items():
            if now > deadline and task not in self._timed_out:
                self._timed_out.add(task)
                task.cancel()

    def cancel_all(self) -> list[asyncio.Task[None]]:
        """The session ends: drop what waits, cancel what runs (their deliveries go back with the
        connection); returns the cancelled reconciles, for the caller to await."""
        self.running = False
        self._wq.remove_where(lambda d: True)
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        return tasks

    def close(self) -> None:
        self._threads.shutdown(wait=True)

    # ---------------------------------------------------------------- one reconcile

    async def _reconcile(self, ctl: Ctl, key: str, items: list[Delivery], started: float) -> None:
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
                                                    self._slow_step, ctl.name, key)
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
                task = asyncio.current_task()
                if task not in self._timed_out:
                    raise  # connection lost, fenced or shutting down
                task.uncancel()  # type: ignore[union-attr]  # handled: settle it as a failure
                produced = TimeoutError()
            except ChannelGone:
                raise
            except BaseException as exc:  # noqa: BLE001 - SystemExit, KeyboardInterrupt... fail this reconcile, not the worker
                produced = exc
            ran_s = self._clock() - started
            decision = outcome.ACK if produced is None else outcome.decide(
                produced, policy=ctl.controller.retry, attempt=attempt, timeout_s=self._timeout_s, rand=self._rand)
            if decision is outcome.ACK:  # the common case, without another coroutine
                self._stats.succeeded += 1
                self._settler.ack_all(items)
                result = "success"
            else:
                result = await self._settler.settle(ctl, key, items, decision)
        except (asyncio.CancelledError, ChannelGone) as exc:
            task = asyncio.current_task()
            if isinstance(exc, asyncio.CancelledError) and task in self._timed_out and self.running:
                # its deadline passed while its retry or park waited for a confirm: give the event back
                task.uncancel()  # type: ignore[union-attr]
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
                                         ran_s if result == "success" else self._clock() - started)
            self._finish(ctl, key, items)

    def _finish(self, ctl: Ctl, key: str, items: list[Delivery]) -> None:
        self._wq.done((ctl.index, key), len(items))
        self._inflight -= 1
        for d in items:
            part = d.part
            part.dispatched -= 1
            if part.dispatched == 0:
                part.idle.set()
        self.pump()

    def _slow_step(self, seconds: float, controller: str, key: str) -> None:
        """The blocked-loop watchdog (``pool.fence``): a step that held the loop names itself."""
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
