"""What each reconcile leaves behind for the bench, and what the bench makes of it.

Data flow: the bench controller (``bench.controllers``, running inside each pool worker)
calls ``Recorder.add`` once per reconcile; the recorder appends one fixed-size binary
record to a ``bytearray`` and writes it to ``$BENCH_RECORD_DIR/<pid>.rec`` every
``FLUSH_S`` (a timer on the worker's loop), whenever the buffer passes ``FLUSH_BYTES``,
and at process exit (a multiprocessing finalizer: pool workers leave through
``os._exit``, so ``atexit`` would never run). One ``os.write`` per flush, not per event.

The bench process tails those files with ``RecordReader.poll`` (complete records only)
and, when the load is over, ``account`` turns the records plus what the publishers
sent into the figures: events covered, duplicates, overlapping reconciles of one key,
latencies and completions per time bucket.

A record is six int64 (``REC``): key index, event sequence ``n`` within that key, deliveries
covered (``ctx.coalesced + 1``), reconcile start and end (``time.monotonic_ns``: one clock
for every process on a Linux host) and the publish time the event carried (same clock).
Each key's events come from one publisher, in order, through one partition queue, so a
reconcile that saw event ``n`` covering ``c`` deliveries accounts for events ``n-c+1 .. n``.
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing.util
import os
import struct
import time
from array import array
from dataclasses import dataclass, field

REC = struct.Struct("<6q")  # key, n, covered, start_ns, end_ns, published_ns
FIELDS = 6
FLUSH_BYTES = 64 * 1024  # ~1,400 records: one write per this many reconciles under load
FLUSH_S = 0.2  # idle flush, so the bench sees the tail of a load within a progress tick
BUCKET_NS = 100_000_000  # completions are counted in 100 ms buckets (throughput timelines)
ENV_DIR = "BENCH_RECORD_DIR"


class Recorder:
    """Per-process record buffer (see the module docstring). Cheap: one pack and one extend per add."""

    def __init__(self) -> None:
        self._fd = -1
        self._buf = bytearray()
        self._timer = False

    def _open(self) -> None:
        directory = os.environ[ENV_DIR]
        self._buf = bytearray()
        self._fd = os.open(os.path.join(directory, f"{os.getpid()}.rec"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        multiprocessing.util.Finalize(None, self.flush, exitpriority=100)
        self._timer = False

    def add(self, key: int, n: int, covered: int, start_ns: int, end_ns: int, published_ns: int) -> None:
        if self._fd < 0:  # first record in this worker (the supervisor forks workers before any)
            self._open()
        self._buf += REC.pack(key, n, covered, start_ns, end_ns, published_ns)
        if len(self._buf) >= FLUSH_BYTES:
            self.flush()
        if not self._timer:
            self._start_timer()

    def _start_timer(self) -> None:
        self._timer = True
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # a thread-pool reconcile: flushes on size and at exit only

        def tick() -> None:
            self.flush()
            loop.call_later(FLUSH_S, tick)
        loop.call_later(FLUSH_S, tick)

    def flush(self) -> None:
        if self._buf and self._fd >= 0:
            view = memoryview(self._buf)
            while view:
                view = view[os.write(self._fd, view):]
            self._buf = bytearray()


class RecordReader:
    """Tails every ``*.rec`` file of a directory; keeps the records read since the last ``reset``."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._offsets: dict[str, int] = {}
        self.records = array("q")
        self.covered = 0  # sum of the covered column over ``records``

    def reset(self) -> None:
        """Forget records read so far (a new load starts on the same consumers)."""
        self.poll()
        self.records = array("q")
        self.covered = 0

    def poll(self) -> int:
        """Read complete records appended since the last poll; returns how many."""
        new = 0
        if not os.path.isdir(self.directory):
            return 0  # the pool has not started yet
        for name in os.listdir(self.directory):
            if not name.endswith(".rec"):
                continue
            path = os.path.join(self.directory, name)
            offset = self._offsets.get(name, 0)
            size = os.path.getsize(path)
            size -= (size - offset) % REC.size
            if size <= offset:
                continue
            with open(path, "rb") as fh:
                fh.seek(offset)
                chunk = array("q", fh.read(size - offset))
            self._offsets[name] = size
            self.records.extend(chunk)
            self.covered += sum(chunk[2::FIELDS])
            new += len(chunk) // FIELDS
        return new


@dataclass
class Accounting:
    """What the records say about one load."""

    reconciles: int = 0
    covered: int = 0  # distinct published events covered by some reconcile
    duplicates: int = 0  # deliveries covered twice (redeliveries); 0 in a clean run
    overlaps: int = 0  # reconciles that started before an earlier one of the same key ended
    latencies_ms: list[float] = field(default_factory=list)  # end - published, per reconcile
    published_ns: list[int] = field(default_factory=list)  # the publish time of each latency above
    buckets: dict[int, int] = field(default_factory=dict)  # completion bucket -> events covered
    first_end_ns: int = 0
    last_end_ns: int = 0


def account(records: array, want_latency: bool = True) -> Accounting:
    """Covered events, duplicates, overlaps, latencies and completion buckets of ``records``."""
    acc = Accounting(reconciles=len(records) // FIELDS)
    ranges: dict[int, list[tuple[int, int]]] = {}
    spans: dict[int, list[tuple[int, int]]] = {}
    buckets = acc.buckets
    lat, pub = acc.latencies_ms, acc.published_ns
    first, last = 0, 0
    it = iter(records)
    for key, n, c, s, e, t in zip(it, it, it, it, it, it):
        ranges.setdefault(key, []).append((n - c + 1, n))
        spans.setdefault(key, []).append((s, e))
        b = e // BUCKET_NS
        buckets[b] = buckets.get(b, 0) + c
        if want_latency:
            lat.append((e - t) / 1e6)
            pub.append(t)
        if not first or e < first:
            first = e
        if e > last:
            last = e
    acc.first_end_ns, acc.last_end_ns = first, last
    total = 0
    for rs in ranges.values():
        rs.sort()
        hi = 0
        for lo_n, hi_n in rs:
            total += hi_n - lo_n + 1
            if hi_n > hi:
                acc.covered += hi_n - max(lo_n - 1, hi)
                hi = hi_n
    acc.duplicates = total - acc.covered
    acc.overlaps = count_overlaps(spans)
    return acc


def count_overlaps(spans: dict[int, list[tuple[int, int]]]) -> int:
    """Per key, intervals [start, end] that begin before an earlier-started one has ended."""
    bad = 0
    for ss in spans.values():
        if len(ss) < 2:
            continue
        ss.sort()
        end = ss[0][1]
        for s, e in ss[1:]:
            if s < end:
                bad += 1
            if e > end:
                end = e
    return bad


def split_warmup(latencies_ms: list[float], published_ns: list[int], cut_ns: int) -> tuple[list[float], list[float]]:
    """Latencies of events published from ``cut_ns`` on and of those before it (the warm-up), each sorted."""
    steady = sorted(x for x, t in zip(latencies_ms, published_ns) if t >= cut_ns)
    warm = sorted(x for x, t in zip(latencies_ms, published_ns) if t < cut_ns)
    return steady, warm


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list (0 for an empty one)."""
    if not sorted_values:
        return 0.0
    rank = math.ceil(q / 100 * len(sorted_values))
    return sorted_values[min(len(sorted_values), max(rank, 1)) - 1]


def now_ns() -> int:
    return time.monotonic_ns()
