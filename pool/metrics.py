"""Prometheus metrics: counted in each worker, summed in the supervisor, served as text over HTTP.

Data flow:

    Worker --WorkerMetrics.<event>(...)--> in-process lists and dicts (a few hundred ns a call, no I/O)
      every REPORT_INTERVAL_S: MetricsReporter sends messages.encode_metrics(WorkerMetrics.encode()) on the
      worker's status pipe (the same pipe that carries its states; also its heartbeat)
    Supervisor --Aggregate.update(slot, payload)--> latest snapshot per live worker
      a worker that dies: Aggregate.retire(slot) keeps its counters and histograms (so totals
      stay monotonic across restarts) and drops its gauges
    GET /metrics --MetricsServer thread--> Aggregate.render(): live + retired, text format 0.0.4

Names and labels follow client-go / controller-runtime so existing dashboards work:
``workqueue_*`` carry both ``name`` and ``controller`` (controller-runtime ≥ 0.15 sets both
to the controller's name), ``controller_runtime_*`` and ``ctlpool_*`` carry ``controller``.
No dependency: prometheus_client's multiprocess mode needs a shared directory of mmap files;
a snapshot a second over a pipe we already have is simpler and enough.
"""

from __future__ import annotations

import asyncio
import http.server
import logging
import os
import threading
from bisect import bisect_left
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import orjson

from .messages import encode_metrics

log = logging.getLogger("ctlpool.metrics")

REPORT_INTERVAL_S = 1.0  # snapshot period: fresh enough for a 15 s scrape, ~1 KB/s per worker
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# client-go's workqueue buckets: 10 ns to 1000 s, ×10 (ExponentialBuckets(10e-9, 10, 12))
WORKQUEUE_BUCKETS = tuple(10.0 ** e for e in range(-8, 4))
# controller-runtime's reconcile_time_seconds buckets
RECONCILE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.6, 0.7, 0.8,
                     0.9, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5, 6, 7, 8, 9, 10, 15, 20, 25, 30,
                     40, 50, 60)
# a confirm takes ~0.1-5 ms on a healthy broker; seconds mean flow control or a disk alarm
CONFIRM_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

RESULTS = ("success", "error", "requeue_after")


@dataclass(frozen=True)
class Family:
    name: str
    kind: str
    """``counter``, ``gauge`` or ``histogram``."""
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()
    merge: str = "sum"
    """How workers' values add up: ``sum``, or ``max`` for what every worker reports alike (the layout)."""


_WQ = ("controller", "name")
FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("workqueue_depth", "gauge", "Current depth of workqueue (keys waiting for a reconcile)", _WQ),
    Family("workqueue_adds_total", "counter", "Total number of adds handled by workqueue (one per delivery)", _WQ),
    Family("workqueue_queue_duration_seconds", "histogram",
           "How long in seconds an item stays in workqueue before being requested", _WQ, WORKQUEUE_BUCKETS),
    Family("workqueue_work_duration_seconds", "histogram",
           "How long in seconds processing an item from workqueue takes (reconcile, confirms and acks)", _WQ,
           WORKQUEUE_BUCKETS),
    Family("workqueue_retries_total", "counter", "Total number of retries handled by workqueue", _WQ),
    Family("controller_runtime_reconcile_total", "counter", "Total number of reconciliations per controller",
           ("controller", "result")),
    Family("controller_runtime_reconcile_errors_total", "counter", "Total number of reconciliation errors per controller",
           ("controller",)),
    Family("controller_runtime_reconcile_time_seconds", "histogram", "Length of time per reconciliation per controller",
           ("controller",), RECONCILE_BUCKETS),
    Family("ctlpool_events_coalesced_total", "counter",
           "Deliveries folded into a reconcile of the same key beyond the first", ("controller",)),
    Family("ctlpool_parked_total", "counter", "Events moved to the parking queue, by reason", ("controller", "reason")),
    Family("ctlpool_partitions_owned", "gauge", "Partition queues consumed by this host's workers", ("controller",)),
    Family("ctlpool_handovers_total", "counter", "Partitions acquired or released by this host's workers",
           ("controller", "direction")),
    Family("ctlpool_rerouted_total", "counter", "Events re-routed through the exchange by the ring-drift guard",
           ("controller",)),
    Family("ctlpool_publish_confirm_seconds", "histogram", "Time from publish to the broker's confirm", (),
           CONFIRM_BUCKETS),
    Family("ctlpool_fenced_total", "counter",
           "Sessions a worker dropped because its lease ran out (frozen process or blocked event loop)"),
    Family("ctlpool_loop_blocked_total", "counter",
           "Reconcile steps that held a worker's event loop for a second or more", ("controller",)),
    Family("ctlpool_stalls_total", "counter",
           "Sessions a worker ended because it held work no reconcile would start (a liveness bug, logged)"),
    Family("ctlpool_oldest_unacked_seconds", "gauge",
           "How long each worker's oldest delivery not yet acked has been held (to within a second)", ("worker",)),
    Family("ctlpool_partitions", "gauge", "Partition queues of the controller's live layout", ("controller",),
           merge="max"),
    Family("ctlpool_resizes", "gauge", "Resizes of the controller's partitions completed (its live layout says)",
           ("controller",), merge="max"),
    Family("ctlpool_broker_blocked", "gauge",
           "Worker publish connections the broker blocks (memory or disk alarm)"),
    Family("ctlpool_worker_restarts_total", "counter", "Worker processes restarted by the supervisor after dying"),
    Family("ctlpool_workers", "gauge", "Worker processes: configured, alive, ready", ("state",)),
)}

Key = tuple[str, tuple[str, ...]]  # (family name, label values in the family's label order)


class _Cells:
    """One controller's counters (one-element lists) and histograms, looked up once, bumped in place."""

    __slots__ = ("adds", "retries", "coalesced", "rerouted", "errors", "results", "queue_h", "work_h", "time_h")

    def __init__(self, m: "WorkerMetrics", c: str) -> None:
        wq = (c, c)
        self.adds = m._counter(("workqueue_adds_total", wq))
        self.retries = m._counter(("workqueue_retries_total", wq))
        self.coalesced = m._counter(("ctlpool_events_coalesced_total", (c,)))
        self.rerouted = m._counter(("ctlpool_rerouted_total", (c,)))
        self.errors = m._counter(("controller_runtime_reconcile_errors_total", (c,)))
        self.results = {r: m._counter(("controller_runtime_reconcile_total", (c, r))) for r in RESULTS}
        self.queue_h = m._histogram(("workqueue_queue_duration_seconds", wq), WORKQUEUE_BUCKETS)
        self.work_h = m._histogram(("workqueue_work_duration_seconds", wq), WORKQUEUE_BUCKETS)
        self.time_h = m._histogram(("controller_runtime_reconcile_time_seconds", (c,)), RECONCILE_BUCKETS)


class WorkerMetrics:
    """One worker's counters, gauges and histograms; each event method costs a few hundred ns.

    A controller's series are created (at zero) the first time it is named, so dashboards see
    them before the first error. ``sampler``, when set, is called before each snapshot to set
    gauges (depth, partitions owned) from the worker's state instead of tracking them on the hot path.
    """

    __slots__ = ("_counters", "_gauges", "_hists", "_cells", "_confirm_h", "sampler")

    def __init__(self) -> None:
        self._counters: dict[Key, list[float]] = {}
        self._gauges: dict[Key, float] = {}
        self._hists: dict[Key, list[float]] = {}  # per-bucket counts, the +Inf bucket, then the sum
        self._cells: dict[str, _Cells] = {}
        self._confirm_h = self._histogram(("ctlpool_publish_confirm_seconds", ()), CONFIRM_BUCKETS)
        self.sampler: Callable[[WorkerMetrics], None] | None = None

    # ---- events (the worker calls these)

    def added(self, controller: str) -> None:
        """A delivery went into the work queue."""
        (self._cells.get(controller) or self._new(controller)).adds[0] += 1

    def started(self, controller: str, queued_s: float, coalesced: int) -> None:
        """A reconcile started after its key waited ``queued_s``, covering ``coalesced`` extra deliveries."""
        c = self._cells.get(controller) or self._new(controller)
        h = c.queue_h  # histograms are inlined: a call costs as much as the update
        h[bisect_left(WORKQUEUE_BUCKETS, queued_s)] += 1  # the first bucket whose bound is >= the value ("le")
        h[-1] += queued_s
        c.coalesced[0] += coalesced

    def reconciled(self, controller: str, result: str, reconcile_s: float, work_s: float) -> None:
        """A reconcile ended: ``result`` is success|error|requeue_after; ``work_s`` includes settling."""
        c = self._cells.get(controller) or self._new(controller)
        c.results[result][0] += 1
        if result == "error":
            c.errors[0] += 1
        h = c.time_h
        h[bisect_left(RECONCILE_BUCKETS, reconcile_s)] += 1
        h[-1] += reconcile_s
        h = c.work_h
        h[bisect_left(WORKQUEUE_BUCKETS, work_s)] += 1
        h[-1] += work_s

    def retried(self, controller: str) -> None:
        """A failed reconcile was sent to a delay tier to try again."""
        (self._cells.get(controller) or self._new(controller)).retries[0] += 1

    def parked(self, controller: str, reason: str) -> None:
        self._counter(("ctlpool_parked_total", (controller, reason)))[0] += 1

    def rerouted(self, controller: str) -> None:
        (self._cells.get(controller) or self._new(controller)).rerouted[0] += 1

    def handover(self, controller: str, direction: str) -> None:
        """A partition was ``acquired`` or ``released``."""
        self._counter(("ctlpool_handovers_total", (controller, direction)))[0] += 1

    def fenced(self) -> None:
        """The worker's lease ran out: it cancelled its in-flight work and rejoins."""
        self._counter(("ctlpool_fenced_total", ()))[0] += 1

    def loop_blocked(self, controller: str) -> None:
        """A reconcile step held the event loop for ``worker.BLOCKED_STEP_S`` or more."""
        self._counter(("ctlpool_loop_blocked_total", (controller,)))[0] += 1

    def stalled(self) -> None:
        """The worker held work no reconcile would start, and started a fresh session."""
        self._counter(("ctlpool_stalls_total", ()))[0] += 1

    def broker_blocked(self, blocked: bool) -> None:
        self._gauges[("ctlpool_broker_blocked", ())] = 1 if blocked else 0

    def confirmed(self, seconds: float) -> None:
        """A publish was confirmed ``seconds`` after it was sent."""
        h = self._confirm_h
        h[bisect_left(CONFIRM_BUCKETS, seconds)] += 1
        h[-1] += seconds

    # ---- gauges (set by the sampler)

    def depth(self, controller: str, keys: int) -> None:
        self._gauges[("workqueue_depth", (controller, controller))] = keys

    def owned(self, controller: str, partitions: int) -> None:
        self._gauges[("ctlpool_partitions_owned", (controller,))] = partitions

    def layout(self, controller: str, partitions: int, resizes: int) -> None:
        self._gauges[("ctlpool_partitions", (controller,))] = partitions
        self._gauges[("ctlpool_resizes", (controller,))] = resizes

    def oldest_unacked(self, worker: int, seconds: float) -> None:
        self._gauges[("ctlpool_oldest_unacked_seconds", (str(worker),))] = round(seconds, 1)

    # ---- plumbing

    def _new(self, controller: str) -> _Cells:
        cells = self._cells[controller] = _Cells(self, controller)
        return cells

    def _counter(self, key: Key) -> list[float]:
        cell = self._counters.get(key)
        if cell is None:
            cell = self._counters[key] = [0]
        return cell

    def _histogram(self, key: Key, bounds: tuple[float, ...]) -> list[float]:
        h = self._hists.get(key)
        if h is None:
            h = self._hists[key] = [0] * (len(bounds) + 2)
        return h

    def encode(self) -> bytes:
        """A snapshot for the supervisor (after running the sampler)."""
        if self.sampler is not None:
            self.sampler(self)
        return orjson.dumps({"c": [[k[0], k[1], v[0]] for k, v in self._counters.items()],
                             "g": [[k[0], k[1], v] for k, v in self._gauges.items()],
                             "h": [[k[0], k[1], v] for k, v in self._hists.items()]})


class MetricsReporter:
    """In a worker: send ``messages.encode_metrics(snapshot)`` every ``REPORT_INTERVAL_S`` through ``send``.

    The snapshots double as the worker's heartbeat (the supervisor feeds systemd's watchdog on
    them), so a failing sampler must not stop them: the last good snapshot is sent again and
    the failure logged once.
    """

    def __init__(self, metrics: WorkerMetrics, send: Callable[[bytes], None], *, worker: int) -> None:
        self.metrics = metrics
        self.send = send
        self.worker = worker
        self._last = encode_metrics(b"{}")
        self._failed = False

    def send_now(self) -> None:
        try:
            self._last = encode_metrics(self.metrics.encode())
        except Exception:  # noqa: BLE001 - whatever the sampler raised
            if not self._failed:
                log.exception("metrics snapshot failed; repeating the last one", extra={"worker": self.worker})
            self._failed = True
        self.send(self._last)

    async def run(self) -> None:
        while True:
            self.send_now()
            await asyncio.sleep(REPORT_INTERVAL_S)


@dataclass
class Snapshot:
    counters: dict[Key, float]
    gauges: dict[Key, float]
    histograms: dict[Key, list[float]]

    @classmethod
    def decode(cls, payload: bytes) -> "Snapshot":
        data = orjson.loads(payload)

        def table(rows: list[list[Any]]) -> dict[Key, Any]:
            # a family this supervisor does not know (version skew during an upgrade) is skipped
            return {(name, tuple(labels)): v for name, labels, v in rows if name in FAMILIES}

        return cls(table(data.get("c", [])), table(data.get("g", [])), table(data.get("h", [])))


def _add_into(into: dict[Key, Any], rows: dict[Key, Any]) -> None:
    for k, v in rows.items():
        have = into.get(k)
        if have is None:
            into[k] = list(v) if isinstance(v, list) else v
        elif isinstance(v, list):
            if len(have) == len(v):
                into[k] = [a + b for a, b in zip(have, v)]
        elif FAMILIES[k[0]].merge == "max":
            into[k] = max(have, v)
        else:
            into[k] = have + v


class Aggregate:
    """The sum over workers: live snapshots plus what dead workers had counted (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._live: dict[int, Snapshot] = {}
        self._retired = Snapshot({}, {}, {})

    def update(self, worker: int, payload: bytes) -> None:
        """The latest snapshot of slot ``worker``; an undecodable one is ignored."""
        try:
            snap = Snapshot.decode(payload)
        except (orjson.JSONDecodeError, ValueError, TypeError):
            log.warning("worker %d sent an unreadable metrics snapshot", worker, extra={"worker": worker})
            return
        with self._lock:
            self._live[worker] = snap

    def retire(self, worker: int) -> None:
        """Slot ``worker``'s process is gone: keep its counters and histograms, forget its gauges."""
        with self._lock:
            snap = self._live.pop(worker, None)
            if snap is not None:
                _add_into(self._retired.counters, snap.counters)
                _add_into(self._retired.histograms, snap.histograms)

    def total(self) -> Snapshot:
        with self._lock:
            out = Snapshot({}, {}, {})
            _add_into(out.counters, self._retired.counters)
            _add_into(out.histograms, self._retired.histograms)
            for snap in self._live.values():
                _add_into(out.counters, snap.counters)
                _add_into(out.gauges, snap.gauges)
                _add_into(out.histograms, snap.histograms)
            return out

    def render(self, extra: Iterable[tuple[str, tuple[str, ...], float]] = ()) -> str:
        """The text exposition of the total plus ``extra`` (family, labels, value) samples of the supervisor."""
        snap = self.total()
        for name, labels, value in extra:
            kind = FAMILIES[name].kind
            (snap.gauges if kind == "gauge" else snap.counters)[(name, labels)] = value
        return render(snap)


def render(snap: Snapshot) -> str:
    """Prometheus text format 0.0.4: HELP and TYPE for every family, then its samples sorted by labels."""
    out: list[str] = []
    for fam in FAMILIES.values():
        out.append(f"# HELP {fam.name} {fam.help}")
        out.append(f"# TYPE {fam.name} {fam.kind}")
        if fam.kind == "histogram":
            for (name, labels), h in sorted((k, v) for k, v in snap.histograms.items() if k[0] == fam.name):
                if len(h) != len(fam.buckets) + 2:
                    continue
                cumulative = 0.0
                for bound, n in zip((*fam.buckets, float("inf")), h):
                    cumulative += n
                    le = _labels(fam.labels, labels, ("le", _num(bound)))
                    out.append(f"{name}_bucket{le} {_num(cumulative)}")
                out.append(f"{name}_sum{_labels(fam.labels, labels)} {_num(h[-1])}")
                out.append(f"{name}_count{_labels(fam.labels, labels)} {_num(cumulative)}")
        else:
            rows = snap.counters if fam.kind == "counter" else snap.gauges
            for (name, labels), v in sorted((k, v) for k, v in rows.items() if k[0] == fam.name):
                out.append(f"{name}{_labels(fam.labels, labels)} {_num(v)}")
    return "\n".join(out) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: tuple[str, ...], values: tuple[str, ...], *more: tuple[str, str]) -> str:
    pairs = [*zip(names, values), *more]
    if not pairs:
        return ""
    return "{" + ",".join(f'{n}="{_escape(str(v))}"' for n, v in pairs) + "}"


def _num(v: float) -> str:
    if v == float("inf"):
        return "+Inf"
    if float(v).is_integer() and abs(v) < 2**53:
        return str(int(v))
    return repr(float(v))


class MetricsServer:
    """``/metrics``, ``/livez`` and ``/readyz`` on a daemon thread (``http.server``; scrapes are rare)."""

    def __init__(self, host: str, port: int, *, metrics: Callable[[], str], live: Callable[[], bool],
                 ready: Callable[[], tuple[bool, str]]) -> None:
        self.host = host
        self.port = port
        self._routes: dict[str, Callable[[], tuple[int, str, str]]] = {
            "/metrics": lambda: (200, CONTENT_TYPE, metrics()),
            "/livez": lambda: (200, "text/plain", "ok\n") if live() else (503, "text/plain", "supervisor loop stalled\n"),
            "/readyz": lambda: _ready_response(ready()),
        }
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind (``OSError`` if the port is taken) and serve on a daemon thread."""
        routes = self._routes

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                route = routes.get(self.path.split("?", 1)[0])
                if route is None:
                    code, ctype, body = 404, "text/plain", "not found: try /metrics, /livez, /readyz\n"
                else:
                    try:
                        code, ctype, body = route()
                    except Exception:  # a broken render must not kill the server thread
                        log.exception("metrics endpoint %s failed", self.path)
                        code, ctype, body = 500, "text/plain", "internal error\n"
                data = body.encode()
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - no access log in the journal
                pass

        self._server = http.server.ThreadingHTTPServer((self.host, self.port), Handler)
        self._server.daemon_threads = True
        # forked workers must not keep the port open (a restarted supervisor could not bind it)
        os.register_at_fork(after_in_child=self._forget_in_child)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="ctlpool-metrics", daemon=True)
        self._thread.start()

    def _forget_in_child(self) -> None:
        if self._server is not None:
            self._server.socket.close()
            self._server = None

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def _ready_response(state: tuple[bool, str]) -> tuple[int, str, str]:
    ok, summary = state
    return (200 if ok else 503), "text/plain", summary + "\n"
