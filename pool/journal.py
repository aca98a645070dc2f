"""Which deliveries were inside a reconcile when a worker died: the in-flight journal.

Data flow: the supervisor gives each worker slot a ``Store``: ``concurrency`` fixed records in a
shared memory mapping that every process of the slot inherits across ``fork``. It is backed by
``<state-dir>/<node-id>-<slot>.inflight`` when the state directory can hold it (so the records
also outlive the supervisor: a pool restarted by systemd still blames what the last one died
holding), and by anonymous shared memory when it can't (read-only, refused: one WARNING from
the supervisor; the counts then live as long as the supervisor does). Before a reconcile starts,
the worker's ``Journal`` writes the digest of the event it hands to the controller (``digest(key,
body)``: a CRC-32 of key and body and the body's length) and the deaths already blamed on that
event into a free record (``enter``); when the reconcile ends, however it ends, it zeroes that
record (``leave``). Stores into the mapping cost no system call, and they outlive the process
however it dies (SIGKILL, a segfault, the OOM killer).

After a death, the supervisor reads the records (``Store.records``) to tell a crash inside a
reconcile from one outside, and the slot's next worker takes them (``Journal.take_leftover``)
as blame: each of those events has now killed a worker one more time, and that count is what
``--max-deliveries`` limits. Nothing else does — a connection flap, a broker restart, a drain or
a frozen worker redelivers without blame (DESIGN G3). A clean exit leaves every record zero.
A journal file of another size is read only up to this one's (a sparse or corrupt file can't
make the reader load gigabytes).
"""

from __future__ import annotations

import mmap
import os
import struct
import zlib

from .statedir import open_regular

# A record: CRC-32 of key and body, the body's length (mod 2^16), deaths blamed before this
# reconcile. A CRC, not a cryptographic hash: it is computed for every reconcile (~0.2 us
# against ~0.5 us for blake2b), and a collision only matters between one of the few events a
# dead worker held and a redelivered message (odds ~1e-8 per lookup).
_RECORD = struct.Struct(">IHB")
RECORD = _RECORD.size
DIGEST = RECORD - 1
_ZERO = bytes(RECORD)


def _ident(key: str | bytes, body: bytes) -> tuple[int, int]:
    k = key.encode("utf-8", "surrogatepass") if isinstance(key, str) else key  # pika: bytes if not UTF-8
    return zlib.crc32(body, zlib.crc32(k)), len(body) & 0xFFFF


def digest(key: str | bytes, body: bytes) -> bytes:
    """What identifies an event across redeliveries, re-routes and hosts: its key and body."""
    return _RECORD.pack(*_ident(key, body), 0)[:DIGEST]


def path_for(state_dir: str, node_id: str, slot: int) -> str:
    return os.path.join(state_dir, f"{node_id}-{slot}.inflight")


class Store:
    """A slot's records in shared memory (see the module docstring); ``path`` is None when anonymous."""

    __slots__ = ("map", "path")

    def __init__(self, mapping: mmap.mmap, path: str | None) -> None:
        self.map = mapping
        self.path = path

    @classmethod
    def open(cls, path: str, slots: int) -> "Store":
        """The slot's journal file, mapped (``OSError`` when it can't be: the caller falls back)."""
        fd = open_regular(path, os.O_RDWR | os.O_CREAT)
        try:
            os.ftruncate(fd, slots * RECORD)  # a file of another size is read up to ours, no further
            return cls(mmap.mmap(fd, slots * RECORD), path)
        finally:
            os.close(fd)

    @classmethod
    def anonymous(cls, slots: int) -> "Store":
        return cls(mmap.mmap(-1, slots * RECORD), None)

    def records(self) -> dict[bytes, int]:
        """Events inside a reconcile -> deaths blamed on each, counting the one that left them there."""
        data = self.map[:]
        out: dict[bytes, int] = {}
        for i in range(0, len(data) - RECORD + 1, RECORD):
            rec = data[i:i + RECORD]
            if rec != _ZERO:
                out[rec[:DIGEST]] = max(out.get(rec[:DIGEST], 0), rec[DIGEST] + 1)
        return out

    def clear(self) -> None:
        self.map[:] = bytes(len(self.map))


class Journal:
    """One worker's writer over its slot's ``Store``. Not thread-safe: the event loop owns it."""

    __slots__ = ("store", "_map", "_free")

    def __init__(self, store: Store) -> None:
        self.store = store
        self._map = store.map
        self._free = list(range(len(store.map) // RECORD - 1, -1, -1))

    @classmethod
    def take_leftover(cls, store: Store) -> tuple["Journal", dict[bytes, int]]:
        """Start the slot's journal afresh, returning what its previous process left in flight."""
        leftover = store.records()
        store.clear()
        return cls(store), leftover

    def enter(self, key: str | bytes, body: bytes, deaths: int) -> int:
        """Record the event (``key``, ``body``) as inside a reconcile, ``deaths`` already blamed
        on it; returns the record to ``leave``. -1 when full."""
        if not self._free:
            return -1
        slot = self._free.pop()
        crc, size = _ident(key, body)
        _RECORD.pack_into(self._map, slot * RECORD, crc, size, deaths if deaths < 254 else 254)
        return slot

    def leave(self, slot: int) -> None:
        if slot < 0:
            return
        at = slot * RECORD
        self._map[at:at + RECORD] = _ZERO
        self._free.append(slot)

    def close(self) -> None:
        """A clean exit: nothing was in flight."""
        self.store.clear()
