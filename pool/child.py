"""A worker process's entry point (after the supervisor forks it): signals, pinning, the
worker, and what it reports on the status pipe.

Data flow: the supervisor forks ``worker_main(settings, index, cpu, status, supervisor_pid)``.
It asks the kernel for SIGTERM when the supervisor dies (``die_with_parent``), ignores SIGINT
and SIGHUP (the supervisor decides), pins itself to ``cpu``, loads the controllers, and runs a
``pool.worker.Worker`` on uvloop until it drains (SIGTERM, however often) or stops. States go to
the supervisor as ``pool.messages`` (``encode_state``), and every ``metrics.REPORT_INTERVAL_S`` a
metrics snapshot (``MetricsReporter``), which doubles as the worker's heartbeat.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import sys
from typing import Any

from .errors import ConfigError
from .exits import EXIT_CONFIG
from .messages import WorkerState, encode_state
from .metrics import MetricsReporter, WorkerMetrics
from .notify import forget_env
from .settings import PoolSettings

log = logging.getLogger("ctlpool.worker")

PR_SET_PDEATHSIG = 1  # prctl(2) option, <linux/prctl.h>: signal this process when its parent dies


def die_with_parent(sig: int) -> None:
    """Have the kernel send ``sig`` to this process when the thread that forked it exits (Linux).

    The supervisor forks from its main thread, so that is when the supervisor exits, however
    it dies. Elsewhere, or if prctl fails, an orphaned worker runs on until something stops it.
    """
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed (%s): this worker may outlive its supervisor",
                    os.strerror(ctypes.get_errno()))


def _started(pid: int) -> float | None:
    """When the supervisor started (wall clock): this pool's age among pools sharing member ids."""
    import psutil

    try:
        return float(psutil.Process(pid).create_time())
    except psutil.Error:
        return None


def worker_main(settings: PoolSettings, index: int, cpu: int | None, status: Any, supervisor_pid: int,
                journal: Any = None) -> None:
    """Entry point of a worker process (after fork); ``supervisor_pid`` is the pid that forked it,
    ``journal`` the slot's in-flight journal store (``pool.journal.Store``)."""
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    die_with_parent(signal.SIGTERM)
    if os.getppid() != supervisor_pid:
        return  # the supervisor died before prctl took effect: no SIGTERM will come; nothing to drain yet

    import uvloop

    from .controller import load_controller
    from .logs import configure
    from .worker import Worker

    forget_env()  # only the supervisor speaks to systemd (NotifyAccess=main)
    configure(settings.log_format, settings.log_level)
    if cpu is not None:
        import psutil

        try:
            psutil.Process().cpu_affinity([cpu])
        except (OSError, psutil.Error) as exc:  # a sandbox that forbids sched_setaffinity
            logging.getLogger("ctlpool.worker").warning("could not pin to CPU %d (%s); running unpinned", cpu, exc,
                                                        extra={"worker": index})

    def send(message: bytes) -> None:
        try:
            status.send_bytes(message)
        except OSError:
            pass  # the supervisor is gone; SIGTERM or the orphan's own exit follows

    def report(state: WorkerState) -> None:
        send(encode_state(state))

    metrics = WorkerMetrics()
    try:
        controllers = [load_controller(r) for r in settings.controllers]
    except ConfigError as exc:  # `run` checked them before forking; a Supervisor used from code may not have
        logging.getLogger("ctlpool.worker").error("%s", exc, extra={"worker": index})
        sys.exit(EXIT_CONFIG)  # the supervisor stops: restarting can't fix a configuration
    worker = Worker(settings=settings, controllers=controllers, index=index, on_state=report, metrics=metrics,
                    journal=journal, pool_started=_started(supervisor_pid))

    reporter = MetricsReporter(metrics, send, worker=index)

    async def main() -> None:
        # SIGTERM always means "drain" here, however often it comes (a group-wide kill and
        # the supervisor's forward may both arrive); the supervisor escalates with SIGKILL.
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, worker.request_stop)
        reporting = asyncio.ensure_future(reporter.run())
        try:
            await worker.run()
        finally:
            reporting.cancel()
        reporter.send_now()  # the final counts, so totals survive this process

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())
    if worker.exit_code:
        sys.exit(worker.exit_code)  # EXIT_STALLED: the supervisor starts a fresh one; EXIT_CONFIG: it stops
