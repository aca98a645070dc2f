"""``Harness``: run controllers in-process with the worker's own rooms, an in-memory broker and a virtual clock.

Data flow: ``Harness(*controllers)`` builds a ``pool.worker.Worker``'s rooms exactly as a pool
process does (``Worker._build``: intake, the keyed work queue, dispatch, the outcome decision,
settling), bound to the in-memory broker of ``pool.testing.broker``, each controller with one
partition that this worker owns. ``publish`` delivers an event to a controller's partition. What
the worker publishes is routed as RabbitMQ would: to a controller under test (delivered), to a
delay tier (delivered again when the tier's TTL has passed on the virtual clock, so a retry or a
``requeue_after`` is served by the tiers exactly as in production: a delay under half the
smallest tier comes back at once), to the parking queue (``parked``), or to a controller not
under test (``published``). ``run(seconds)`` and ``run_until_idle()`` drive an event loop whose
clock is virtual: when nothing is runnable it jumps to the next timer, so ``asyncio.sleep``,
retries and requeues take no real time; a plain ``def`` reconcile runs in the worker's thread
pool in real time (the clock waits for it). Every reconcile is recorded (``reconciles``) with the
event it was given, its attempt, how many deliveries it covered and what it returned or raised.

The semantics are the pool's because the code is: one reconcile per key at a time, events that
arrive meanwhile coalesced into one follow-up with the latest payload, ``RetryPolicy`` backoff
(jitter off unless ``rand`` is given), ``Permanent`` and ``max_attempts`` parking with the reason,
the reconcile timeout, ``ctx.publish`` confirmed before the ack.
"""

from __future__ import annotations

import asyncio
import heapq
import inspect
import selectors
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable

import msgspec

from .. import codec
from ..controller import Controller, Result
from ..errors import Permanent
from ..settings import resolve
from ..worker import Worker
from .broker import FakeConnection, FakeSession, Wire

POLL_S = 0.001  # how often (real seconds) the virtual loop looks while a plain-def reconcile runs in a thread
IDLE_LIMIT_S = 7 * 86_400.0  # run_until_idle gives up after this much virtual time (a requeue that never ends)
WALL_START = 1_800_000_000.0  # the wall clock's virtual epoch (the worker stamps parked events with it)


@dataclass(frozen=True)
class Reconcile:
    """One call of a controller's ``reconcile``."""

    controller: str
    key: str
    event: Any
    attempt: int
    """Failures so far of this event (``ctx.attempt``)."""
    coalesced: int
    """Deliveries folded into this call beyond the first (``ctx.coalesced``)."""
    at: float
    """Virtual seconds since the harness started."""
    outcome: str
    """``converged``, ``requeue_after``, ``error`` or ``permanent``."""
    result: Any = None
    """What it returned, or the exception it raised."""

    @property
    def error(self) -> BaseException | None:
        return self.result if isinstance(self.result, BaseException) else None


@dataclass(frozen=True)
class Published:
    """An event ``ctx.publish`` sent to a controller that is not under test."""

    controller: str
    key: str
    event: Any
    at: float


@dataclass(frozen=True)
class Parked:
    """An event the pool parked, and why."""

    controller: str
    key: str
    reason: str
    """A ``codec.PARK_*`` value: ``max-attempts``, ``permanent``, ``undecodable``, ..."""
    error: str
    event: Any
    at: float


class HarnessTimeout(AssertionError):
    """``run_until_idle`` reached its virtual time limit with work left (a requeue that never ends?)."""


class _Selector(selectors.BaseSelector):
    """The loop's selector: real I/O (the loop's own wake-up pipe) is looked at without waiting; when
    the loop would wait for a timer, the virtual clock jumps there instead, unless a thread is at
    work (then it waits, in real time, for it)."""

    def __init__(self, loop: "VirtualLoop") -> None:
        self._loop = loop
        self._real = selectors.DefaultSelector()

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if self._loop.threads:
            return self._real.select(POLL_S if timeout is None else min(timeout, POLL_S))
        events = self._real.select(0)
        if not events and timeout:
            self._loop.now += timeout
        return events

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._real.register(fileobj, events, data)

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self._real.unregister(fileobj)

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._real.modify(fileobj, events, data)

    def get_map(self) -> Any:
        return self._real.get_map()

    def close(self) -> None:
        self._real.close()


class VirtualLoop(asyncio.SelectorEventLoop):
    """An asyncio loop on a virtual clock (see ``_Selector``)."""

    def __init__(self) -> None:
        self.now = 0.0
        self.threads = 0  # executor jobs running: the clock waits for them
        super().__init__(selector=_Selector(self))

    def time(self) -> float:
        return self.now

    def run_in_executor(self, executor: Any, func: Any, *args: Any) -> asyncio.Future[Any]:
        fut = super().run_in_executor(executor, func, *args)
        self.threads += 1

        def done(_f: asyncio.Future[Any]) -> None:
            self.threads -= 1
        fut.add_done_callback(done)
        return fut


class Harness:
    """See the module docstring. Synchronous: it runs its own loop."""

    def __init__(self, *controllers: Controller, rand: Callable[[], float] = lambda: 0.5, prefix: str = "ctl",
                 setup: bool = True, **settings: Any) -> None:
        """``controllers`` under test (each one's ``setup()`` is called first, as a worker does,
        unless ``setup`` is False: a test that gives them fakes itself); ``rand``: the retry jitter's
        randomness (0.5: none); ``settings``: any ``ctlpool run`` setting by its name
        (``reconcile_timeout_s=5``, ``tiers_s="1,4"``, ``max_deliveries=2``...)."""
        self.loop = VirtualLoop()
        self.prefix = prefix
        self.reconciles: list[Reconcile] = []
        self.published: list[Published] = []
        self.parked: list[Parked] = []
        self._due: list[tuple[float, int, str, str, bytes, Any]] = []  # tier deliveries: (when, n, ctl, key, body, props)
        self._n = 0
        self._controllers = {c.name: c for c in controllers}
        for c in controllers:
            if setup:
                c.setup()
            _record(c, self)
        flags = {"node-id": "harness", "partitions": 1, "prefix": prefix, "reroute-on-acquire": "false",
                 **{k.replace("_", "-"): v for k, v in settings.items()}}
        self.settings = resolve(flags, env={})
        self.worker = Worker(settings=self.settings, controllers=list(controllers), clock=self.loop.time,
                             wall=lambda: WALL_START + self.loop.time(), rand=rand)
        self.loop.run_until_complete(self._open())

    async def _open(self) -> None:
        self.wire = Wire(auto_confirm=True)
        self.wire.on_publish = self._route
        self.conn = FakeConnection(self.wire, clean=True)
        session = FakeSession(self.wire, self.conn, self.loop.time)
        settler, _intake, self.dispatch, self.ownership = self.worker._build(self.loop)
        settler.pub = session.pub  # type: ignore[assignment]
        self.dispatch.lease, self.dispatch.running = session.lease, True
        self.dispatch.conn = self.conn  # type: ignore[assignment]
        self.ownership.bind(session)  # type: ignore[arg-type]
        for ctl in self.worker.ctls:
            await self.ownership.acquire(ctl, 0)
        self._tiers = {ctl.names.tier(t): (ctl.name, float(t)) for ctl in self.worker.ctls
                       for t in self.settings.topology.tiers_s}
        self._exchanges = {ctl.exchange: ctl for ctl in self.worker.ctls}
        self.loop.call_later(self.settings.worker.heartbeat_interval_s, self._tick)

    def _tick(self) -> None:
        self.dispatch.expire()  # reconciles past --reconcile-timeout-s, on the virtual clock
        self.loop.call_later(self.settings.worker.heartbeat_interval_s, self._tick)

    # ---------------------------------------------------------------- what a test does

    def publish(self, controller: str, key: str, event: Any = None) -> None:
        """Publish ``event`` (a dict, a msgspec Struct, anything JSON) for ``controller``'s item ``key``."""
        if controller not in self._controllers:
            raise ValueError(f"controller {controller!r} is not under test here: {sorted(self._controllers)}")
        # delivered when the loop runs (``run``, ``run_until_idle``), as a broker's delivery would be
        self.loop.call_soon(self._deliver, controller, key, codec.encode({} if event is None else event), None)

    def run(self, seconds: float) -> None:
        """Let ``seconds`` of virtual time pass, doing everything that falls due meanwhile."""
        self.loop.run_until_complete(asyncio.sleep(seconds))

    def run_until_idle(self, limit_s: float = IDLE_LIMIT_S) -> None:
        """Run until nothing is left to do: no reconcile running or waiting, no retry or requeue to
        come back, no publish unconfirmed. ``HarnessTimeout`` after ``limit_s`` of virtual time."""
        self.loop.run_until_complete(self._until_idle(self.loop.time() + limit_s))

    @property
    def now(self) -> float:
        """Virtual seconds since the harness started."""
        return self.loop.time()

    def reconciles_of(self, key: str, controller: str | None = None) -> list[Reconcile]:
        return [r for r in self.reconciles if r.key == key and (controller is None or r.controller == controller)]

    def close(self) -> None:
        """Cancel what still runs (as a worker's session ending does), let it finish, close the loop."""
        self.dispatch.cancel_all()
        pending = asyncio.all_tasks(self.loop)
        for t in pending:
            t.cancel()
        self.loop.run_until_complete(_gathered(pending))
        self.dispatch.close()
        self.loop.close()

    def __enter__(self) -> "Harness":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---------------------------------------------------------------- the broker's part

    def _idle(self) -> bool:
        return (not self.dispatch.in_flight and not self.dispatch._wq.statistics().items and not self._due
                and not self.wire.pending and not self.loop._ready)  # type: ignore[attr-defined]

    async def _until_idle(self, deadline: float) -> None:
        loop = self.loop
        while not self._idle():
            if loop.time() > deadline:
                raise HarnessTimeout(f"still busy after {deadline:g} virtual seconds: {self._busy()}")
            # nothing runnable: on to the next timer (a tier delivery, a sleeping reconcile, the tick)
            timers = loop._scheduled  # type: ignore[attr-defined]
            wait = 0.0 if loop._ready or not timers else max(0.0, timers[0].when() - loop.time())  # type: ignore[attr-defined]
            await asyncio.sleep(wait)

    def _busy(self) -> str:
        return (f"{self.dispatch.in_flight} reconciles running, {len(self._due)} retries or requeues to come "
                f"(next at {self._due[0][0]:g}s)" if self._due else f"{self.dispatch.in_flight} reconciles running")

    def _route(self, sent: SimpleNamespace) -> None:
        """What RabbitMQ does with a publish of the worker's (see the module docstring)."""
        at = self.loop.time()
        if sent.exchange == "" and sent.key.endswith(".parked"):
            controller = sent.key[len(self.prefix) + 1:-len(".parked")]
            h = sent.headers or {}
            self.parked.append(Parked(controller, str(h.get(codec.H_KEY, "")), str(h.get(codec.H_REASON, "")),
                                      str(h.get(codec.H_ERROR, "")), _decoded(sent.body), at))
        elif sent.exchange in self._tiers:
            controller, ttl = self._tiers[sent.exchange]
            self._n += 1
            heapq.heappush(self._due, (at + ttl, self._n, controller, sent.key, sent.body, sent))
            self.loop.call_at(at + ttl, self._deliver_due)
        elif sent.exchange in self._exchanges:
            self.loop.call_soon(self._deliver, self._exchanges[sent.exchange].name, sent.key, sent.body, sent)
        else:
            self.published.append(Published(sent.exchange[len(self.prefix) + 1:], sent.key, _decoded(sent.body), at))

    def _deliver_due(self) -> None:
        while self._due and self._due[0][0] <= self.loop.time():
            _at, _n, controller, key, body, sent = heapq.heappop(self._due)
            self._deliver(controller, key, body, sent)

    def _deliver(self, controller: str, key: str, body: bytes, sent: Any) -> None:
        ctl = next(c for c in self.worker.ctls if c.name == controller)
        ch = self.conn.consumers[ctl.names.partition(0, 1)]
        props = sent.props if sent is not None and sent.props is not None else None
        extra = {n: getattr(props, n) for n in ("message_id", "correlation_id", "timestamp") if getattr(props, n, None)}
        ch.deliver(None, key, body, headers=dict(sent.headers) if sent is not None and sent.headers else None,
                   properties=extra)


async def _gathered(tasks: set[asyncio.Task[Any]]) -> None:
    await asyncio.gather(*tasks, return_exceptions=True)


def _decoded(body: bytes) -> Any:
    try:
        return msgspec.json.decode(body)
    except msgspec.DecodeError:
        return body


def _outcome(result: Any) -> str:
    if isinstance(result, Permanent):
        return "permanent"
    if isinstance(result, BaseException):
        return "error"
    if isinstance(result, Result) and result.requeue_after is not None:
        return "requeue_after"
    return "converged"


def _record(controller: Controller, harness: Harness) -> None:
    """Wrap ``controller.reconcile`` so that every call is recorded (async stays async)."""
    inner = controller.reconcile

    def note(key: str, event: Any, ctx: Any, at: float, result: Any) -> None:
        harness.reconciles.append(Reconcile(controller.name, key, event, ctx.attempt, ctx.coalesced, at,
                                            _outcome(result), result))

    if inspect.iscoroutinefunction(inner):
        async def reconcile(key: str, event: Any, ctx: Any) -> Any:
            at = harness.loop.time()
            try:
                result = await inner(key, event, ctx)
            except BaseException as exc:
                note(key, event, ctx, at, exc)
                raise
            note(key, event, ctx, at, result)
            return result
    else:
        def reconcile(key: str, event: Any, ctx: Any) -> Any:  # type: ignore[misc]
            at = harness.loop.time()
            try:
                result = inner(key, event, ctx)
            except BaseException as exc:
                note(key, event, ctx, at, exc)
                raise
            note(key, event, ctx, at, result)
            return result
    controller.reconcile = reconcile  # type: ignore[method-assign]


__all__ = ["Harness", "HarnessTimeout", "Parked", "Published", "Reconcile", "VirtualLoop"]
