"""Test helpers that talk to the real broker and run the real pool as subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pika
import pika.exceptions

from pool.process import PoolExited, RunProcess

ROOT = Path(__file__).resolve().parent.parent


def list_names(prefix: str, ctl_node: tuple[str, ...] = ()) -> tuple[list[str], list[str]]:
    """Queues and exchanges whose names start with ``prefix.`` (via rabbitmqctl; ``("-n", NODE)``: a cluster's)."""
    def names(kind: str) -> list[str]:
        out = subprocess.run(["rabbitmqctl", "-q", *ctl_node, f"list_{kind}", "name"], capture_output=True,
                             text=True, timeout=60).stdout
        return [line.strip() for line in out.splitlines() if line.strip().startswith(prefix + ".")]
    return names("queues"), names("exchanges")


def _connect(url: str, tries: int = 3) -> pika.BlockingConnection:
    """A blocking connection to the first node of ``url`` (one URL or a cluster's list) that answers;
    a loaded 2-core machine can miss pika's 10 s handshake once."""
    from pool.urls import split_urls

    nodes = [u.strip() for u in split_urls(url)]
    for attempt in range(tries):
        for node in nodes:
            params = pika.URLParameters(node)
            params.stack_timeout = 30
            try:
                return pika.BlockingConnection(params)
            except pika.exceptions.AMQPConnectionError:
                if attempt == tries - 1 and node == nodes[-1]:
                    raise
        time.sleep(1)
    raise AssertionError("unreachable")


def delete_prefix(url: str, prefix: str, ctl_node: tuple[str, ...] = ()) -> None:
    delete(url, *list_names(prefix, ctl_node))


def delete(url: str, queues: list[str], exchanges: list[str]) -> None:
    conn = _connect(url)
    try:
        ch = conn.channel()
        for q in queues:
            ch.queue_delete(q)
        for e in exchanges:
            ch.exchange_delete(e)
    finally:
        conn.close()


def ctlpool_cli(url: str, *args: str, stdin: Any = subprocess.DEVNULL) -> subprocess.CompletedProcess[str]:
    """``ctlpool ARGS`` as an operator runs it: a subprocess, the broker URL from the environment."""
    env = {**os.environ, "CTLPOOL_AMQP_URL": url, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "pool.cli", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=60, stdin=stdin)


def exists(url: str, kind: str, name: str) -> bool:
    """Whether the exchange or queue ``name`` exists (a passive declare)."""
    conn = _connect(url)
    try:
        getattr(conn.channel(), f"{kind}_declare")(name, passive=True)
        return True
    except pika.exceptions.ChannelClosedByBroker as exc:
        assert exc.reply_code == 404, exc
        return False
    finally:
        if conn.is_open:
            conn.close()


def queue_depth(url: str, queue: str) -> int:
    conn = _connect(url)
    try:
        return conn.channel().queue_declare(queue, passive=True).method.message_count
    finally:
        conn.close()


def get_all(url: str, queue: str) -> list[tuple[Any, Any, bytes]]:
    """Take every ready message from ``queue`` (acked): (method, properties, body)."""
    conn = _connect(url)
    out = []
    try:
        ch = conn.channel()
        while True:
            m, p, b = ch.basic_get(queue, auto_ack=True)
            if m is None:
                return out
            out.append((m, p, b))
    finally:
        conn.close()


def peek_all(url: str, queue: str) -> list[tuple[Any, Any, bytes]]:
    """Every ready message of ``queue``, left where it was (taken, then put back unacked)."""
    conn = _connect(url)
    out = []
    try:
        ch = conn.channel()
        while True:
            m, p, b = ch.basic_get(queue, auto_ack=False)
            if m is None:
                return out
            out.append((m, p, b))
    finally:
        conn.close()  # every message taken goes back, in order


class Pool:
    """``ctlpool run`` as a real subprocess (``pool.process.RunProcess``: its own process group)."""

    def __init__(self, url: str, prefix: str, controllers: str, *args: str, env: dict[str, str] | None = None,
                 log_path: Path | None = None) -> None:
        # its own state dir (journals, node-id lock): pools of other tests or runs on this host never meet
        state = tempfile.mkdtemp(prefix="ctlpool-state-", dir=log_path.parent if log_path else None)
        self.log_path = log_path if log_path is not None else Path(state) / "pool.log"
        self.run = RunProcess(["--controllers", controllers, "--prefix", prefix, "--log-format", "json",
                               "--state-dir", state, *args], self.log_path,
                              env={"CTLPOOL_AMQP_URL": url, **(env or {})}, cwd=ROOT)

    @property
    def cmd(self) -> list[str]:
        return self.run.cmd

    @cmd.setter
    def cmd(self, cmd: list[str]) -> None:  # to run it under a wrapper
        self.run.cmd = cmd

    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        return self.run.proc

    def start(self) -> "Pool":
        self.run.start()
        return self

    def wait_ready(self, timeout: float = 60) -> None:
        """Until the supervisor started last logs that all workers are consuming."""
        try:
            self.run.wait_ready(timeout)
        except (PoolExited, TimeoutError) as exc:
            raise AssertionError(str(exc)) from None

    def worker_pids(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.run.pid)], capture_output=True, text=True).stdout
        return [int(x) for x in out.split()]

    def signal(self, sig: int) -> None:
        self.run.signal(sig)

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM (drain) and wait; returns the exit code (negative when it had to be killed)."""
        return self.run.stop(timeout)

    def kill(self) -> None:
        self.run.kill()

    def logs(self) -> list[dict[str, Any]]:
        return read_json_log(self.log_path)


def read_json_log(path: Path) -> list[dict[str, Any]]:
    """The JSON log lines of a file (other lines, e.g. a crash's traceback, are skipped)."""
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def publish_many(url: str, prefix: str, controller: str, events: list[tuple[str, Any]]) -> None:
    """Publish (key, payload) pairs with confirms through the real Publisher."""
    import asyncio

    from pool.publisher import Publisher

    async def go() -> None:
        async with Publisher(url, prefix=prefix) as pub:
            await pub.publish_many((controller, k, p) for k, p in events)

    asyncio.run(go())


def wait_until(pred, timeout: float, interval: float = 0.1, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
