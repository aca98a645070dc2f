"""What a supervisor keeps on its host besides its workers: the node-id lock and each worker slot's journal.

Data flow: ``Station.open`` takes the node-id lock in the state directory (``pool.nodelock``:
one supervisor per node id per host) and makes each slot's in-flight journal store
(``pool.journal.Store``): a file in the state directory, or anonymous shared memory with one
WARNING when the directory can't hold it. The stores are made before any worker is forked, so
every process of a slot shares its slot's. Every loop turn the supervisor calls ``check``:
the lock file must still be ours (a temp-directory cleaner may remove it); it is taken again if
it vanished, and ``ConfigError`` says when it cannot be (another pool got it meanwhile).
``close`` gives the lock up.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from . import journal, nodelock
from .settings import PoolSettings

log = logging.getLogger("ctlpool.supervisor")


@dataclass
class Station:
    lock: nodelock.NodeLock
    journals: list[journal.Store]

    @classmethod
    def open(cls, settings: PoolSettings, slots: int) -> "Station":
        """Lock the node id, then make the journals (``ConfigError``: the lock is not ours to take)."""
        lock = nodelock.acquire(settings.state_dir, settings.node_id)
        stores, failed = [], None
        for index in range(slots):
            path = journal.path_for(settings.state_dir, settings.node_id, index)
            try:
                stores.append(journal.Store.open(path, settings.worker.concurrency))
            except OSError as exc:
                failed = failed or f"{path}: {exc.strerror or exc}"
                stores.append(journal.Store.anonymous(settings.worker.concurrency))
        if failed:
            log.warning("cannot keep the in-flight journals in --state-dir (%s); keeping them in memory: an event "
                        "that kills its worker is still parked after --max-deliveries deaths, but the counts do "
                        "not survive a restart of the whole pool", failed)
        return cls(lock, stores)

    def check(self) -> None:
        """The lock file is still ours, or taken again (logged); ``ConfigError`` if it can't be."""
        if self.lock.check():
            log.warning("the node-id lock %s was removed under the running pool (a temp-directory cleaner?); "
                        "took it again", self.lock.path)

    def close(self) -> None:
        self.lock.release()
