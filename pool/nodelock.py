"""One supervisor per node id per host: an exclusive ``flock`` on ``<state_dir>/<node_id>.lock``.

Data flow: ``acquire`` prepares the state directory (``pool.statedir``: created 0700, or
refused when anyone else controls it), opens the lock file (a regular file, no symlink
followed), takes a non-blocking exclusive ``flock`` and writes the holder's pid into the file;
the returned ``NodeLock`` keeps the file open until ``release``. A lock file removed under a
running pool (a tmp cleaner's ``rm -rf`` of the directory) would let a second pool with the
same node id start: the supervisor calls ``check`` every tick, which notices and takes the
lock afresh at the same path, or raises ``ConfigError`` when another process got there first. Two supervisors with the
same ``--node-id`` would announce the same member ids (``node_id/worker_index``) and fight
over the same partitions, so the second one gets ``ConfigError`` (exit 2) naming the pid
that holds the lock.

The descriptor is inherited by the forked workers and a ``flock`` lives as long as any
descriptor of it is open, so workers still draining after their supervisor died (they get
SIGTERM from the kernel, see ``child.worker_main``) keep the node id until they exit:
a new supervisor cannot start next to them. The kernel drops the lock when the last one
exits, however it dies; a stale file is harmless.
"""

from __future__ import annotations

import errno
import fcntl
import os
from dataclasses import dataclass

import psutil

from . import statedir
from .errors import ConfigError


@dataclass
class NodeLock:
    """An acquired node-id lock; ``release`` (or process exit) gives it up."""

    path: str
    fd: int
    node_id: str = ""

    def check(self) -> bool:
        """Whether the lock file is still ours at its path; if it vanished, lock it afresh (True
        then). ``ConfigError`` when that is impossible (another process holds the new one)."""
        try:
            st = os.stat(self.path, follow_symlinks=False)
            mine = os.fstat(self.fd)
            if (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino):
                return False
        except FileNotFoundError:
            pass
        fresh = acquire(os.path.dirname(self.path), self.node_id)
        self.release()  # the old inode's lock guards nothing any more
        self.fd = fresh.fd
        return True

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # this process's copy; forked workers still holding theirs keep the lock
            self.fd = -1


def lock_path(state_dir: str, node_id: str) -> str:
    return os.path.join(state_dir, f"{node_id}.lock")


def acquire(state_dir: str, node_id: str) -> NodeLock:
    """Lock ``node_id`` on this host, or raise ``ConfigError`` saying who holds it (or why the dir is unusable)."""
    path = lock_path(state_dir, node_id)
    statedir.prepare(state_dir)
    try:
        fd = statedir.open_regular(path, os.O_RDWR | os.O_CREAT)
    except OSError as exc:
        raise ConfigError(f"--state-dir {state_dir}: cannot create the node-id lock {path}: "
                          f"{exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = _read_pid(fd)
        os.close(fd)
        if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES):
            raise ConfigError(f"--state-dir {state_dir}: cannot lock {path}: {exc.strerror or exc}") from None
        raise ConfigError(in_use_message(node_id, holder, path)) from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError as exc:
        os.close(fd)
        raise ConfigError(f"--state-dir {state_dir}: cannot write the node-id lock {path}: "
                          f"{exc.strerror or exc}") from None
    return NodeLock(path, fd, node_id)


def in_use_message(node_id: str, holder: int | None, path: str) -> str:
    """The one line a second supervisor prints; says so when the recorded supervisor is gone."""
    who = f"ctlpool pid {holder}" if holder is not None else "another ctlpool (its pid is not written yet)"
    if holder is not None:
        holders = _holders(path)
        if holder not in holders:
            workers = f" (pids {', '.join(map(str, holders))})" if holders else ""
            who += (f", which has exited, but its workers{workers} still hold the lock while they drain; "
                    "start again once they are gone")
    return f"node id {node_id} is in use on this host by {who} (--node-id must be unique per host)"


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace")
    except OSError:
        return None
    first = text.split("\n", 1)[0].strip()  # the pid's line (a shorter pid may overwrite a longer one)
    return int(first) if first.isdigit() else None


def _holders(path: str) -> list[int]:
    """Pids of this user's processes with ``path`` open: the lock's holders."""
    real = os.path.realpath(path)
    out = []
    for p in psutil.process_iter(["pid"]):
        try:
            if any(f.path == real for f in p.open_files()):
                out.append(p.pid)
        except (psutil.Error, OSError):
            continue  # another user's process, or gone meanwhile
    return sorted(out)
