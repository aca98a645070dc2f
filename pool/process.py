"""``ctlpool run`` as a child process: what the tests, the demo and the bench share.

Data flow: ``RunProcess(args, log_path, env=...)``. ``start`` launches ``python -m pool.cli
run ARGS`` in its own process group, with the directory holding ``pool`` first on
``PYTHONPATH`` (so the workers import the same code and the controllers beside it), stdin
closed, stdout and stderr appended to ``log_path``. ``wait_ready`` reads what the log gained
since that start — never an earlier run's lines — until the supervisor says "all N workers
ready", and fails with ``PoolExited`` if the process ends first or ``TimeoutError`` when it
takes too long. ``stop`` sends SIGTERM (the pool drains) and waits, killing the whole group
when it takes longer; ``kill`` kills the group at once.

``own_session`` (the default) puts the pool in a session of its own, so a terminal's Ctrl-C
reaches only the caller; the bench keeps it in its own session instead (the kernel's autogroup
scheduler shares CPU per session, and the floor it is compared with runs in the bench's).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Mapping

READY = re.compile(rb"all \d+ workers ready")  # the supervisor's line, in json and text log formats
ROOT = Path(__file__).resolve().parent.parent  # the directory holding ``pool`` (and ``controllers``)
POLL_S = 0.02  # how often wait_ready reads the log


class PoolExited(RuntimeError):
    """The pool exited before it was ready; the message carries its exit code and the log's tail."""


class RunProcess:
    """See the module docstring."""

    def __init__(self, args: list[str], log_path: Path, *, env: Mapping[str, str] | None = None,
                 cwd: Path | None = None, own_session: bool = True) -> None:
        self.cmd = [sys.executable, "-m", "pool.cli", "run", *args]
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        self.env = {**os.environ, **(env or {}), "PYTHONPATH": path}
        self.log_path = log_path
        self.cwd = cwd
        self.own_session = own_session
        self.proc: subprocess.Popen[bytes] | None = None
        self._read_from = 0  # log offset where this start's lines begin

    def start(self) -> "RunProcess":
        with open(self.log_path, "ab") as out:
            self._read_from = out.tell()
            self.proc = subprocess.Popen(self.cmd, env=self.env, cwd=self.cwd, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=self.own_session,
                                         process_group=None if self.own_session else 0)
        return self

    def wait_ready(self, timeout_s: float) -> int:
        """Until the pool started last is ready; returns that moment (``time.monotonic_ns``)."""
        assert self.proc is not None, "start() first"
        deadline = time.monotonic() + timeout_s
        seen = self._read_from
        while True:
            with open(self.log_path, "rb") as fh:
                fh.seek(seen)
                text = fh.read()
            complete = text[:text.rfind(b"\n") + 1]  # a line still being written is read next time
            if READY.search(complete):
                return time.monotonic_ns()
            seen += len(complete)
            if self.proc.poll() is not None:
                raise PoolExited(f"the pool exited with {self.proc.returncode} before it was ready:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the pool was not ready after {timeout_s:.0f}s:\n{self.tail()}")
            time.sleep(POLL_S)

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout_s: float) -> int:
        """SIGTERM (drain) and wait; the group is killed when it takes longer. The exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.proc.wait()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
