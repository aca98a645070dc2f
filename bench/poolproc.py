"""The pool under test: ``ctlpool run`` as a real subprocess, watched from outside.

Data flow: ``PoolProcess.start`` runs (``pool.process.RunProcess``) ``ctlpool run --controllers
bench.controllers:<Class> --prefix <unique> ... --log-format json`` in its own process group, with
``CTLPOOL_AMQP_URL`` and ``BENCH_RECORD_DIR`` in its environment and its log in
``<out>/<name>.log``, and returns once the supervisor logs "all N workers ready". While a
load runs, ``sample`` reads each worker's RSS and CPU time with psutil (the supervisor's
children). ``stop`` sends SIGTERM (the pool drains: in-flight reconciles finish and are acked,
workers flush their records at exit) and waits; a pool that does not exit is killed.
``rerouted`` reads what the ring-drift guard re-routed from the workers' log lines.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from pool.process import PoolExited, RunProcess

from .broker import Target
from .records import Accounting, RecordReader, account

ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 120.0  # 64 quorum partitions and the membership settle take a few seconds
STOP_TIMEOUT_S = 90.0  # the pool's drain timeout (60 s) plus its kill grace
MB = 1024 * 1024
_REROUTED = re.compile(r"^(\S+): ring-drift guard re-routed (\d+) events")


@dataclass(frozen=True)
class PoolOptions:
    """Flags of ``ctlpool run`` that the bench varies."""

    workers: int
    prefetch: int
    concurrency: int
    controller: str = "Noop"  # a class in bench.controllers
    sleep_ms: float = 0.0  # for Sleepy


class PoolProcess:
    """One ``ctlpool run`` on one target; see the module docstring."""

    side = "pool"

    def __init__(self, target: Target, opts: PoolOptions, workdir: Path, name: str = "pool") -> None:
        self.target = target
        self.opts = opts
        self.record_dir = workdir / f"{name}.records"
        self.log_path = workdir / f"{name}.log"
        self.reader = RecordReader(str(self.record_dir))
        self.run: RunProcess | None = None
        self.max_rss_mb = 0.0
        self.pinned: bool | None = None
        self._workers: list[psutil.Process] = []

    def start(self, timeout_s: float = READY_TIMEOUT_S) -> int:
        """Start the pool and wait for "workers ready"; returns that moment in monotonic ns."""
        shutil.rmtree(self.record_dir, ignore_errors=True)  # records of an earlier run in the same --out
        self.record_dir.mkdir(parents=True)
        o, t = self.opts, self.target
        args = ["--controllers", f"bench.controllers:{o.controller}", "--prefix", t.prefix,
                "--workers", str(o.workers), "--prefetch", str(o.prefetch), "--concurrency", str(o.concurrency),
                "--partitions", str(t.partitions), "--queue-type", t.queue_type, "--log-format", "json",
                # journals and the node-id lock beside the records: a pool already running here is left alone
                "--state-dir", str(self.record_dir.parent / "pool-state")]
        env = {"CTLPOOL_AMQP_URL": t.url, "BENCH_RECORD_DIR": str(self.record_dir), "BENCH_SLEEP_MS": str(o.sleep_ms)}
        self.log_path.unlink(missing_ok=True)  # a fresh log: "ready" and re-route counts are per run
        # its own process group (killpg at clean-up; the terminal's Ctrl-C goes to the bench, which
        # drains it), but the bench's session (see pool.process)
        self.run = RunProcess(args, self.log_path, env=env, cwd=ROOT, own_session=False).start()
        try:
            ready = self.run.wait_ready(timeout_s)
        except (PoolExited, TimeoutError) as exc:
            raise RuntimeError(f"{exc}\n(see {self.log_path})") from None
        self._workers = psutil.Process(self.run.pid).children()
        self.pinned = all(len(w.cpu_affinity()) == 1 for w in self._workers)
        return ready

    @property
    def started(self) -> bool:
        return self.run is not None

    def begin(self) -> None:
        """A load starts: forget the records of earlier loads."""
        self.reader.reset()

    def done(self) -> int:
        """Deliveries covered by reconciles recorded since ``begin``."""
        self.reader.poll()
        return self.reader.covered

    def collect(self) -> Accounting:
        """Account for the records since ``begin`` (the pool keeps running)."""
        self.reader.poll()
        return account(self.reader.records)

    def cpu_s(self) -> float:
        """CPU time (user + system) the workers used so far."""
        total = 0.0
        for w in self._workers:
            try:
                c = w.cpu_times()
                total += c.user + c.system
            except psutil.Error:
                pass
        return total

    def sample(self) -> None:
        """Note the largest worker RSS seen so far."""
        for w in self._workers:
            try:
                self.max_rss_mb = max(self.max_rss_mb, w.memory_info().rss / MB)
            except psutil.Error:
                pass

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM (drain) and wait; returns the supervisor's exit code (killed: negative)."""
        if self.run is None:
            return 0
        code = self.run.stop(timeout_s)
        self.reader.poll()  # the records workers flushed on their way out
        return code

    def log_lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def rerouted(self) -> int:
        """Deliveries the ring-drift guard re-routed (last count logged per partition queue)."""
        per_queue: dict[str, int] = {}
        for rec in self.log_lines():
            m = _REROUTED.match(str(rec.get("msg", "")))
            if m:
                per_queue[m.group(1)] = int(m.group(2))
        return sum(per_queue.values())

    def errors(self) -> list[str]:
        return [str(r.get("msg")) for r in self.log_lines() if r.get("level") in ("error", "critical")]
