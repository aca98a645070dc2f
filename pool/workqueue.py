"""Keyed work queue with client-go ``workqueue`` semantics, no I/O.

Data flow: the worker ``add``s every delivery under its item key. A key is *ready*
(queued for a reconcile) at most once; while a key is *processing*, further items
only collect under it (*dirty*). ``get`` hands out the oldest ready key together
with every item collected for it so far; ``done`` ends processing, and if items
arrived meanwhile the key becomes ready again, once, carrying all of them.

So one key is never handed out twice at once, events that arrive during a
reconcile collapse into one follow-up, and the caller holds every collapsed item
until the reconcile that covers them finishes (that is when it acks them).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable, Generic, Hashable, Iterator, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclass(frozen=True, slots=True)
class WorkQueueStats:
    """A snapshot of the queue's counters."""

    ready: int
    """Keys waiting for a reconcile."""
    processing: int
    """Keys handed out by ``get`` and not yet ``done``."""
    items: int
    """Items held (ready, dirty and processing ones)."""
    adds: int
    """Items ever added."""
    coalesced: int
    """Items that joined a key already ready or processing (saved reconciles)."""


class WorkQueue(Generic[K, V]):
    """Keys with pending items; see the module docstring."""

    __slots__ = ("_ready", "_pending", "_processing", "_adds", "_coalesced", "_held")

    def __init__(self) -> None:
        self._ready: deque[K] = deque()
        self._pending: dict[K, list[V]] = {}  # ready or dirty keys -> items not yet handed out
        self._processing: set[K] = set()
        self._adds = 0
        self._coalesced = 0
        self._held = 0

    def add(self, key: K, item: V) -> None:
        """Collect ``item`` under ``key``; the key becomes ready unless it already is or is processing."""
        self._adds += 1
        self._held += 1
        items = self._pending.get(key)
        if items is not None:
            items.append(item)
            self._coalesced += 1
            return
        self._pending[key] = [item]
        if key in self._processing:
            self._coalesced += 1
        else:
            self._ready.append(key)

    def get(self) -> tuple[K, list[V]] | None:
        """Oldest ready key and all its items, now processing; ``None`` when nothing is ready."""
        if not self._ready:
            return None
        key = self._ready.popleft()
        self._processing.add(key)
        return key, self._pending.pop(key)

    def done(self, key: K, handed_out: int) -> None:
        """End processing of ``key`` (whose ``get`` returned ``handed_out`` items)."""
        self._processing.discard(key)
        self._held -= handed_out
        if key in self._pending:
            self._ready.append(key)

    def remove_where(self, predicate: Callable[[V], bool]) -> list[V]:
        """Drop and return not-yet-handed-out items matching ``predicate`` (keys left empty vanish)."""
        removed: list[V] = []
        for key in list(self._pending):
            items = self._pending[key]
            keep = [item for item in items if not predicate(item)]
            if len(keep) == len(items):
                continue
            removed.extend(item for item in items if predicate(item))
            if keep:
                self._pending[key] = keep
            else:
                del self._pending[key]
        if removed:
            self._held -= len(removed)
            self._ready = deque(k for k in self._ready if k in self._pending)
        return removed

    def ready_keys(self) -> Iterator[K]:
        """The keys waiting for a reconcile, oldest first (metrics read it; do not add or get meanwhile)."""
        return iter(self._ready)

    def is_processing(self, key: K) -> bool:
        return key in self._processing

    def processing(self) -> set[K]:
        """The keys handed out by ``get`` and not yet ``done`` (a copy)."""
        return set(self._processing)

    def __len__(self) -> int:
        """Number of ready keys."""
        return len(self._ready)

    def statistics(self) -> WorkQueueStats:
        return WorkQueueStats(
            ready=len(self._ready),
            processing=len(self._processing),
            items=self._held,
            adds=self._adds,
            coalesced=self._coalesced,
        )
