"""Which deliveries were inside a reconcile when a worker died: the in-flight journal.

Data flow: each worker maps a small file, ``<state-dir>/<node-id>-<slot>.inflight``, of
``concurrency`` fixed records. Before a reconcile starts, the worker writes the digest of the
event it hands to the controller (``digest(key, body)``) and the deaths already blamed on that
event into a free record (``enter``); when
the reconcile ends, however it ends, it zeroes that record (``leave``). Writes go to a shared
file mapping: stores into the page cache, no system call, and they outlive the process however
it dies (SIGKILL, a segfault, the OOM killer) — not the host, which is all they have to.

After a death, the supervisor reads the file (``read_inflight``) to tell a crash inside a
reconcile from one outside, and the slot's next worker takes the records (``take_leftover``)
as blame: each of those events has now killed a worker one more time, and that count is what
``--max-deliveries`` limits. Nothing else
does — a connection flap, a broker restart, a drain or a frozen worker redelivers without
blame (DESIGN G3). A clean exit leaves every record zero.
"""

from __future__ import annotations

import hashlib
import mmap
import os

DIGEST = 15  # bytes of a blake2b digest: collisions among a few hundred events in flight are not a concern
RECORD = DIGEST + 1  # and one byte: the deaths blamed on the event before this reconcile
_ZERO = bytes(RECORD)


def digest(key: str, body: bytes) -> bytes:
    """What identifies an event across redeliveries, re-routes and hosts: its key and body."""
    return hashlib.blake2b(key.encode("utf-8", "surrogatepass") + b"\0" + body, digest_size=DIGEST).digest()


def path_for(state_dir: str, node_id: str, slot: int) -> str:
    return os.path.join(state_dir, f"{node_id}-{slot}.inflight")


def read_inflight(path: str) -> dict[bytes, int]:
    """Events a journal file shows inside a reconcile -> deaths blamed on each, counting the one
    that left them there (empty when the file does not exist)."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        return {}
    out: dict[bytes, int] = {}
    for i in range(0, len(data) - RECORD + 1, RECORD):
        rec = data[i:i + RECORD]
        if rec != _ZERO:
            out[rec[:DIGEST]] = max(out.get(rec[:DIGEST], 0), rec[DIGEST] + 1)
    return out


class Journal:
    """One worker's journal (see the module docstring). Not thread-safe: the event loop owns it."""

    __slots__ = ("path", "_map", "_free")

    def __init__(self, path: str, slots: int) -> None:
        self.path = path
        os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, slots * RECORD)
            self._map = mmap.mmap(fd, slots * RECORD)
        finally:
            os.close(fd)
        self._free = list(range(slots - 1, -1, -1))

    @classmethod
    def take_leftover(cls, path: str, slots: int) -> tuple["Journal", dict[bytes, int]]:
        """Open the slot's journal afresh, returning what its previous process left in flight."""
        leftover = read_inflight(path)
        return cls(path, slots), leftover

    def enter(self, event: bytes, deaths: int) -> int:
        """Record ``event`` (a digest) as inside a reconcile, ``deaths`` already blamed on it;
        returns the record to ``leave``. -1 when full."""
        if not self._free:
            return -1
        slot = self._free.pop()
        at = slot * RECORD
        self._map[at:at + DIGEST] = event
        self._map[at + DIGEST] = min(deaths, 254)
        return slot

    def leave(self, slot: int) -> None:
        if slot < 0:
            return
        at = slot * RECORD
        self._map[at:at + RECORD] = _ZERO
        self._free.append(slot)

    def close(self) -> None:
        """A clean exit: nothing was in flight."""
        self._map[:] = bytes(len(self._map))
        self._map.close()
