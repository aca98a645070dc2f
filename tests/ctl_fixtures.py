"""Controllers used by the broker tests, loaded by real pool processes as ``tests.ctl_fixtures:Recorder``.

Every reconcile (success or not) appends one JSON line to ``$CTLPOOL_TEST_RECORD_DIR/<pid>.jsonl``
with one ``os.write`` (atomic for short lines with O_APPEND, and it survives SIGKILL):
key, start/end on CLOCK_MONOTONIC (shared by all processes on the host), pid, the event's
``n`` and ``t`` (when it was published, wall clock, if the load said), deliveries covered
(``c`` = ctx.coalesced + 1), attempt, the wall clock at the end (``w``) and the outcome.

A reconcile cancelled while it waits (connection loss, a lost lease) is recorded too, as
``r="cancelled"`` with ``e`` = when it last ran (it did nothing after that), so it counts toward
overlaps like any other.

The event drives behaviour: ``sleep_ms`` (hold the key), ``block_s`` (block the event loop with
``time.sleep`` once per test, marked by a file; every time with ``block_always``), ``fail`` (raise on attempts < fail),
``raise`` (raise that BaseException by name), ``result`` (return ``"nan"``: Result(nan), ``"str"``: a string),
``crash`` (kill the worker process), ``mark_start`` (record a "start" line at once), ``permanent`` (raise Permanent), ``requeue_after`` with ``t0`` (return Result once, in the first half
of the delay after wall time t0).
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import orjson

from pool import Controller, Permanent, Result, RetryPolicy

_fds: dict[int, int] = {}


def _record(rec: dict[str, Any]) -> None:
    pid = os.getpid()
    fd = _fds.get(pid)
    if fd is None:
        path = os.path.join(os.environ["CTLPOOL_TEST_RECORD_DIR"], f"{pid}.jsonl")
        fd = _fds[pid] = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, orjson.dumps(rec) + b"\n")


def _first_time(name: str) -> bool:
    """True once per test run (a marker file in the record dir, created atomically)."""
    try:
        os.close(os.open(os.path.join(os.environ["CTLPOOL_TEST_RECORD_DIR"], name), os.O_CREAT | os.O_EXCL))
        return True
    except FileExistsError:
        return False


def _policy() -> RetryPolicy:
    return RetryPolicy(base_s=float(os.environ.get("CTLPOOL_TEST_BASE_S", "1")), factor=2.0,
                       max_delay_s=8.0, max_attempts=int(os.environ.get("CTLPOOL_TEST_MAX_ATTEMPTS", "4")),
                       jitter=0.1)


def _outcome(key: str, event: Any, ctx: Any) -> Result | None:
    ev = event if isinstance(event, dict) else {}
    if ev.get("permanent"):
        raise Permanent(f"item {key} is invalid")
    if ctx.attempt < ev.get("fail", 0):
        raise RuntimeError(f"transient failure {ctx.attempt + 1}")
    if ev.get("raise"):
        raise {"SystemExit": SystemExit, "KeyboardInterrupt": KeyboardInterrupt,
               "BaseException": BaseException}[ev["raise"]]("raised by the reconcile")
    if ev.get("result") == "nan":
        return Result(requeue_after=float("nan"))
    if ev.get("result") == "str":
        return "done"  # type: ignore[return-value]
    # requeue once: the first reconcile happens right after t0, the next one about requeue_after later
    if ev.get("requeue_after") is not None and time.time() < ev["t0"] + ev["requeue_after"] / 2:
        return Result(requeue_after=ev["requeue_after"])
    return None


class Recorder(Controller):
    """Async reconcile that records what it did."""

    name = "rec"
    retry = _policy()

    async def reconcile(self, key: str, event: Any, ctx: Any) -> Result | None:
        start = time.monotonic_ns()
        ev = event if isinstance(event, dict) else {}
        if ev.get("crash"):
            os._exit(1)  # a reconcile that kills its worker (segfault, OOM kill...)
        if ev.get("mark_start"):
            _record({"k": key, "s": start, "pid": os.getpid(), "n": ev.get("n"), "r": "start"})
        if ev.get("block_s") and (ev.get("block_always") or _first_time(f"block-{key}")):
            time.sleep(ev["block_s"])  # a blocking call on the loop (what a reconcile must not do)
        if ev.get("sleep_ms"):
            last = time.monotonic_ns()
            try:
                await asyncio.sleep(ev["sleep_ms"] / 1000)
            except asyncio.CancelledError:
                _record({"k": key, "s": start, "e": last, "pid": os.getpid(), "n": ev.get("n"), "p": ctx.partition, "r": "cancelled"})
                raise
        return self._finish(key, ev, ctx, start)

    def _finish(self, key: str, ev: dict[str, Any], ctx: Any, start: int) -> Result | None:
        rec = {"k": key, "s": start, "pid": os.getpid(), "n": ev.get("n"), "c": ctx.coalesced + 1, "p": ctx.partition,
               "a": ctx.attempt, "w": time.time(), "t": ev.get("t")}
        try:
            out = _outcome(key, ev, ctx)
        except Exception as exc:
            rec.update(e=time.monotonic_ns(), r="error", err=str(exc))
            _record(rec)
            raise
        rec.update(e=time.monotonic_ns(), r="requeue" if out else "ok")
        _record(rec)
        return out


class SyncRecorder(Recorder):
    """The same, as a plain ``def`` (runs in the worker's thread pool)."""

    name = "recs"

    def reconcile(self, key: str, event: Any, ctx: Any) -> Result | None:  # type: ignore[override]
        start = time.monotonic_ns()
        ev = event if isinstance(event, dict) else {}
        if ev.get("sleep_ms"):
            time.sleep(ev["sleep_ms"] / 1000)
        return self._finish(key, ev, ctx, start)


class CrashOnStart(Recorder):
    """A worker that dies before it can consume: the supervisor's crash-loop case."""

    name = "crashy"

    def setup(self) -> None:
        os._exit(1)


def read_records(directory: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for name in sorted(os.listdir(directory)):
        if name.endswith(".jsonl"):
            with open(os.path.join(directory, name), "rb") as fh:
                out.extend(orjson.loads(line) for line in fh if line.strip())
    return out


def overlaps(records: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Pairs of reconciles of the same key whose [start, end] intervals intersect."""
    by_key: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        if r["r"] != "start":
            by_key.setdefault(r["k"], []).append(r)
    bad = []
    for recs in by_key.values():
        recs.sort(key=lambda r: r["s"])
        latest_end = None
        prev = None
        for r in recs:
            if latest_end is not None and r["s"] < latest_end:
                bad.append((prev, r))
            if latest_end is None or r["e"] > latest_end:
                latest_end, prev = r["e"], r
    return bad
