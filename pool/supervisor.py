"""The supervisor process: fork workers (CPU-pinned where that helps), keep them alive, drain on signals.

Data flow: ``Supervisor.run`` forks one process per worker slot (``pool.child.worker_main``), each
pinned to a usable CPU unless the broker runs on this host (``pool.pinning``), and then
waits on the workers' sentinels, their status pipes and a self-pipe woken by signals:

- a worker that dies (any cause, SIGKILL included) is restarted after a backoff that
  doubles with its recent deaths, or the supervisor ends with ``EXIT_CRASH_LOOP``
  (``pool.restarts`` decides; a death inside a reconcile is restarted at once, uncounted);
- SIGTERM / SIGINT: drain — each worker gets SIGTERM, stops taking deliveries, finishes
  and acks in-flight work and exits 0; workers still alive after the drain timeout are
  killed. A second SIGTERM / SIGINT kills the workers at once (``EXIT_INTERRUPTED``);
- SIGHUP: rolling restart, one slot at a time, each new worker ready before the next.

Before forking, the supervisor opens its ``Station`` (``pool.station``): it locks its node id
on this host (a second supervisor with the same ``--node-id`` exits with ``EXIT_CONFIG``
instead of joining as the same members; workers inherit the lock and hold it until the last of
them exits) and makes each slot's in-flight journal, shared by every process of the slot. Every
loop turn checks the lock is still ours; one taken by another pool meanwhile stops this one.

Workers ignore SIGINT (a terminal's Ctrl-C reaches the whole process group; the
supervisor decides), drain on SIGTERM however often it comes — the kernel sends them one
when the supervisor dies, SIGKILL included (``PR_SET_PDEATHSIG``), so no orphan keeps
consuming — and report on a pipe:
states (``messages.WorkerState``) and every ``metrics.REPORT_INTERVAL_S`` a metrics snapshot
(``messages.Metrics``), typed by ``pool.messages``; the snapshots double as
a heartbeat of the worker's event loop.

Around the loop: systemd hears READY / WATCHDOG / STATUS / RELOADING / STOPPING
(``pool.notify``); ``--metrics-port`` serves the workers' summed metrics with /livez and
/readyz from a thread (``pool.metrics``) that reads only what the loop last published.
The watchdog is fed while every worker's event loop is heard from (a hung worker stops it),
not only while all are ready: a broker outage or a rolling restart must not get the
service killed by systemd, since restarting fixes neither.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from . import restarts
from .child import worker_main
from .errors import ConfigError
from .journal import Store
from .exits import EXIT_CONFIG, EXIT_CRASH_LOOP, EXIT_INTERRUPTED, EXIT_OK
from .messages import Metrics, WorkerState, decode
from .metrics import Aggregate, MetricsServer
from .notify import Notifier
from .pinning import decide, local_facts
from .settings import PoolSettings
from .station import Station

log = logging.getLogger("ctlpool.supervisor")

KILL_GRACE_S = 5.0  # after the drain timeout, how long we wait before SIGKILL
LOOP_TICK_S = 1.0  # the loop wakes at least this often (restarts, drain deadline, status)
WORKER_SILENT_S = 10.0  # a worker not heard from (state or metrics, ~1/s) this long is hung: starve the watchdog
LIVEZ_STALE_S = 10.0  # /livez fails when the supervisor loop has not turned for this long


def usable_cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def preload_worker_code() -> None:
    """Import now what a worker imports after the fork.

    Workers are forked, so they run the code this process has loaded. Loading all of it up
    front means a worker restarted after a package upgrade on disk runs the same version as
    the rest of the process, never a mix: SIGHUP recycles workers; upgrading is a restart.
    """
    import uvloop  # noqa: F401

    from . import worker, workqueue  # noqa: F401


@dataclass
class _Slot:
    index: int
    cpu: int | None
    proc: Any = None
    status: Any = None
    ready: bool = False
    heard: float = 0.0  # clock() of its last message (state or metrics) or of its start
    deaths: list[float] = field(default_factory=list)
    restart_at: float | None = None
    retiring: bool = False  # being replaced by a rolling restart: its exit is not a crash
    journal: Store | None = None  # shared with every process of this slot (``Station``)


class Supervisor:
    """See the module docstring; ``run()`` returns the process exit code."""

    def __init__(
        self,
        settings: PoolSettings,
        *,
        target: Callable[..., None] = worker_main,
        clock: Callable[[], float] = time.monotonic,
        on_event: Callable[[str, "Supervisor"], None] | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self.settings = settings
        self.target = target
        self.clock = clock
        self.on_event = on_event or (lambda event, sup: None)
        self.notifier = notifier if notifier is not None else Notifier.from_env()
        self.metrics = Aggregate()
        cpus = usable_cpus()
        facts = local_facts(settings.broker.amqp_url) if settings.pin is None else None
        self.pinned, self._pin_why = decide(settings.pin, facts)
        self.slots = [_Slot(i, cpus[i % len(cpus)] if self.pinned else None) for i in range(settings.workers)]
        self.restarts = 0
        self._ctx = multiprocessing.get_context("fork")
        self._signals: list[int] = []
        self._rolling = restarts.Rolling(len(self.slots))
        self._stopping_since: float | None = None
        self.told = Told(self.notifier)
        # what the loop last saw, for the metrics thread (plain attribute writes: no lock needed)
        self._tick = time.monotonic()
        self._alive = 0
        self._station: Station | None = None

    # ------------------------------------------------------------------ processes

    def _start(self, slot: _Slot) -> None:
        recv, send = self._ctx.Pipe(duplex=False)
        slot.proc = self._ctx.Process(target=self.target,
                                      args=(self.settings, slot.index, slot.cpu, send, os.getpid(), slot.journal),
                                      name=f"ctlpool-worker-{slot.index}", daemon=False)
        slot.proc.start()
        send.close()
        slot.status = recv
        slot.ready = False
        slot.heard = self.clock()
        slot.restart_at = None
        log.info("started worker %d (pid %d%s)", slot.index, slot.proc.pid,
                 f", cpu {slot.cpu}" if slot.cpu is not None else "", extra={"worker": slot.index})

    def _signal_all(self, sig: int) -> None:
        for s in self.slots:
            if s.proc is not None and s.proc.is_alive():
                try:
                    os.kill(s.proc.pid, sig)
                except ProcessLookupError:
                    pass

    @property
    def ready(self) -> bool:
        return all(s.ready for s in self.slots)

    def summary(self) -> str:
        alive = sum(1 for s in self.slots if s.proc is not None and s.proc.is_alive())
        ready = sum(1 for s in self.slots if s.ready)
        state = "draining" if self._stopping_since is not None else "reloading" if self._rolling.reloading else "running"
        return f"{state}: {ready}/{len(self.slots)} workers ready, {alive} alive, {self.restarts} restarts"

    def healthy(self, now: float) -> bool:
        """Every worker's event loop was heard from lately (a slot waiting to restart counts as handled)."""
        return all(s.proc is None or now - s.heard <= WORKER_SILENT_S for s in self.slots)

    def _event(self, event: str) -> None:
        """Tell systemd, then the ``on_event`` hook."""
        self.told.event(event, self.summary())
        self.on_event(event, self)

    # ------------------------------------------------------------------ main loop

    def run(self) -> int:
        with signals_wake(self._on_signal) as wake:
            return self._run(wake)

    def _run(self, wake: socket.socket) -> int:
        server: MetricsServer | None = None
        try:
            self._station = Station.open(self.settings, len(self.slots))
            for slot, store in zip(self.slots, self._station.journals):
                slot.journal = store
            preload_worker_code()
            log.info("workers %s: %s", "pinned to CPUs" if self.pinned else "not pinned", self._pin_why)
            server = serve_metrics(self)
            for slot in self.slots:
                self._start(slot)
            return self._loop(wake)
        finally:
            if server is not None:
                server.close()
            for s in self.slots:
                if s.status is not None:
                    s.status.close()
            self.notifier.close()
            if self._station is not None:
                self._station.close()

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self._signals.append(signum)

    def _loop(self, wake: socket.socket) -> int:
        drain_s = self.settings.worker.drain_timeout_s
        watchdog_s = self.notifier.watchdog_s
        # ping at half the watchdog timeout (sd_watchdog_enabled(3)); wake often enough to do so
        tick_s = min(LOOP_TICK_S, watchdog_s / 4) if watchdog_s else LOOP_TICK_S
        while True:
            waitables: list[Any] = [wake]
            for s in self.slots:
                if s.proc is not None:
                    waitables.append(s.proc.sentinel)
                    if s.status is not None:
                        waitables.append(s.status)
            multiprocessing.connection.wait(waitables, tick_s)
            try:
                while wake.recv(64):
                    pass
            except (BlockingIOError, InterruptedError):
                pass
            now = self.clock()

            code = self._handle_signals(now)
            if code is not None:
                return code
            self._read_status(now)
            code = self._reap(now)
            if code is not None:
                return code
            self._publish_state(now)
            code = self._check_lock()
            if code is not None:
                return code
            if self._stopping_since is not None:
                if all(s.proc is None for s in self.slots):
                    log.info("all workers drained; exiting")
                    self._event("stopped")
                    return EXIT_OK
                if now - self._stopping_since > drain_s + KILL_GRACE_S:
                    log.error("workers still alive %.0fs after SIGTERM; killing them", drain_s + KILL_GRACE_S)
                    self._signal_all(signal.SIGKILL)
                continue
            for s in self.slots:
                if s.proc is None and s.restart_at is not None and now >= s.restart_at:
                    self._start(s)
            self._advance_rolling()

    def _check_lock(self) -> int | None:
        """The node-id lock must stay ours (see the module docstring); else stop."""
        try:
            if self._station is not None:
                self._station.check()
        except ConfigError as exc:
            log.error("the node-id lock was removed under the running pool and cannot be taken again (%s); "
                      "stopping", exc)
            return self._give_up(self.clock(), "config", EXIT_CONFIG)
        return None

    def _publish_state(self, now: float) -> None:
        """Once per loop turn: what the metrics thread reads, and what systemd hears (``Told.turn``)."""
        self._tick = time.monotonic()
        self._alive = sum(1 for s in self.slots if s.proc is not None and s.proc.is_alive())
        self.told.turn(now, self.summary(), lambda: self._stopping_since is not None or self.healthy(now))

    def _handle_signals(self, now: float) -> int | None:
        while self._signals:
            sig = self._signals.pop(0)
            if sig == signal.SIGHUP:
                if self._stopping_since is not None:
                    log.info("SIGHUP while draining: ignored")
                    continue
                said = self._rolling.request()
                if said == "start":
                    log.info("SIGHUP: rolling restart of %d workers", len(self.slots))
                    self._event("reloading")
                elif said == "queued":
                    log.info("SIGHUP during a rolling restart: another rolling restart follows this one")
                continue
            if self._stopping_since is None:
                log.info("%s: draining workers (again to stop at once)", signal.Signals(sig).name)
                self._stopping_since = now
                self._rolling.cancel()
                self._event("stopping")
                self._signal_all(signal.SIGTERM)
            else:
                log.warning("%s again: killing workers without draining", signal.Signals(sig).name)
                self._signal_all(signal.SIGKILL)
                for s in self.slots:
                    if s.proc is not None:
                        s.proc.join(5)
                return EXIT_INTERRUPTED
        return None

    def _read_status(self, now: float) -> None:
        for s in self.slots:
            self._read_slot(s, now)

    def _read_slot(self, s: _Slot, now: float) -> None:
        if s.status is None:
            return
        try:
            while s.status.poll():
                message = decode(s.status.recv_bytes())
                s.heard = now
                if isinstance(message, Metrics):
                    self.metrics.update(s.index, message.payload)
                    continue
                if message is None:
                    continue
                was = self.ready
                s.ready = message is WorkerState.READY
                if self.ready and not was:
                    log.info("all %d workers ready", len(self.slots))
                    self._event("ready")
                elif was and not self.ready:
                    self._event("degraded")
        except (EOFError, OSError):
            s.status.close()
            s.status = None

    def _reap(self, now: float) -> int | None:
        for s in self.slots:
            if s.proc is None or s.proc.is_alive():
                continue
            s.proc.join()
            code = s.proc.exitcode
            self._read_slot(s, now)  # its last words: the final metrics snapshot
            s.proc = None
            s.ready = False
            if s.status is not None:
                s.status.close()
                s.status = None
            self.metrics.retire(s.index)
            if self._stopping_since is not None:
                log.info("worker %d exited (%s)", s.index, code, extra={"worker": s.index})
                continue
            if s.retiring:
                s.retiring = False
                self._start(s)
                continue
            if code == EXIT_CONFIG:
                log.error("worker %d stopped on a configuration error (see above); stopping", s.index,
                          extra={"worker": s.index})
                return self._give_up(now, "config", EXIT_CONFIG)
            self.restarts += 1
            inside = s.journal.records() if s.journal is not None else {}
            s.deaths, delay = restarts.after_death(s.deaths, now, bool(inside))
            if delay is None:
                log.error("worker %d died %d times within %.0fs (last exit %s); giving up",
                          s.index, len(s.deaths), restarts.CRASH_LOOP_WINDOW_S, code, extra={"worker": s.index})
                return self._give_up(now, "crash-loop", EXIT_CRASH_LOOP)
            s.restart_at = now + delay
            log.warning("worker %d died (exit %s)%s; restarting in %.1fs", s.index, code,
                        f" inside {len(inside)} reconcile(s)" if inside else "", delay, extra={"worker": s.index})
            self._event("degraded")
        return None

    def _give_up(self, now: float, event: str, code: int) -> int:
        """Drain the other workers (killed after the drain timeout) and end with ``code``."""
        self._stopping_since = now
        self._signal_all(signal.SIGTERM)
        for o in self.slots:
            if o.proc is not None:
                o.proc.join(self.settings.worker.drain_timeout_s + KILL_GRACE_S)
                if o.proc.is_alive():
                    o.proc.kill()
        self._event(event)
        return code

    def _advance_rolling(self) -> None:
        """Rolling restart: retire the slot ``restarts.Rolling`` says, once every worker is ready."""
        step = self._rolling.step(self.ready, any(s.retiring for s in self.slots))
        if step == "done":
            log.info("rolling restart done")
            if self._rolling.reloading:  # a SIGHUP came meanwhile: the next one starts now
                log.info("SIGHUP: rolling restart of %d workers", len(self.slots))
                self._event("reloading")
            else:
                self.told.ready_again(self.summary())
        elif isinstance(step, int):
            s = self.slots[step]
            if s.proc is not None:
                s.retiring = True
                s.ready = False
                os.kill(s.proc.pid, signal.SIGTERM)
            if not self._rolling.line:
                log.info("rolling restart: last worker retiring")


class Told:
    """What systemd hears from the supervisor (``pool.notify``) and what it was last told."""

    def __init__(self, notifier: Notifier) -> None:
        self.notifier = notifier
        self.shown = ""  # the STATUS= it has now (``/readyz`` says it too)
        self._ready_sent = False
        self._last_ping: float | None = None

    def event(self, event: str, summary: str) -> None:
        n = self.notifier
        if event == "ready" and not self._ready_sent:
            self._ready_sent = True
            n.ready(self._show(summary))
        elif event == "reloading":
            n.reloading(self._show(summary))
        elif event == "stopping":
            n.stopping(self._show(summary))
        elif event == "crash-loop":
            n.status("crash loop: a worker kept dying; exiting " + str(EXIT_CRASH_LOOP))
        elif event == "config":
            n.status("a worker stopped on a configuration error; exiting " + str(EXIT_CONFIG))

    def ready_again(self, summary: str) -> None:
        """A rolling restart is done."""
        self.notifier.ready(self._show(summary))

    def turn(self, now: float, summary: str, healthy: Callable[[], bool]) -> None:
        """Every loop turn: STATUS= when the summary changed, WATCHDOG=1 when due and ``healthy()``
        (while draining, TimeoutStopSec= is the limit: the caller says healthy then)."""
        if summary != self.shown:
            self.notifier.status(self._show(summary))
        watchdog_s = self.notifier.watchdog_s
        if watchdog_s and (self._last_ping is None or now - self._last_ping >= watchdog_s / 2) and healthy():
            self._last_ping = now
            self.notifier.watchdog()

    def _show(self, summary: str) -> str:
        self.shown = summary
        return summary


@contextmanager
def signals_wake(handler: Callable[[int, Any], None]) -> Iterator[socket.socket]:
    """SIGTERM, SIGINT and SIGHUP go to ``handler`` and wake the socket yielded (the supervisor's
    loop waits on it); everything is put back as it was on exit."""
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    old_fd = signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        yield wake_r
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
        signal.set_wakeup_fd(old_fd)
        wake_r.close()
        wake_w.close()


def serve_metrics(sup: Supervisor) -> MetricsServer | None:
    """``--metrics-port``: the workers' summed metrics, /livez and /readyz, from a thread that
    reads only what the supervisor's loop last published."""
    host, port = sup.settings.metrics_host, sup.settings.metrics_port
    if not port:
        return None

    def render() -> str:
        return sup.metrics.render([
            ("ctlpool_worker_restarts_total", (), sup.restarts),
            ("ctlpool_workers", ("configured",), len(sup.slots)),
            ("ctlpool_workers", ("alive",), sup._alive),
            ("ctlpool_workers", ("ready",), sum(1 for s in sup.slots if s.ready)),
        ])
    server = MetricsServer(host, port, metrics=render, live=lambda: time.monotonic() - sup._tick < LIVEZ_STALE_S,
                           ready=lambda: (sup.ready and sup._stopping_since is None, sup.told.shown))
    try:
        server.start()
    except OSError as exc:
        raise ConfigError(f"--metrics-port {port}: cannot listen on {host}:{port}: {exc.strerror}") from None
    log.info("metrics on http://%s:%d/metrics (/livez, /readyz)", host, server.port)
    return server
