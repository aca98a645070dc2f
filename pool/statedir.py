"""The state directory: a private place for the node-id lock and the in-flight journals.

Data flow: the settings pick the path (``--state-dir``; else systemd's ``$RUNTIME_DIRECTORY``;
else ``$XDG_RUNTIME_DIR/ctlpool``; else ``ctlpool-<uid>`` in the temp directory). Before
anything is opened there, ``prepare`` creates the directory (0700) if it is missing, and refuses
with one line (``ConfigError``, exit 2) a path that is a symlink, not a directory, not owned by
this user, or writable by group or others: in a shared ``/tmp`` anyone can create
``ctlpool-<uid>`` first and fill it with symlinks that make the pool overwrite other files, or
FIFOs that hang it. Every file in it is then opened with ``open_regular``: ``O_NOFOLLOW`` (a
symlink is refused, not followed), non-blocking (opening a FIFO can't hang), and refused unless
it is a regular file of ours.
"""

from __future__ import annotations

import os
import stat

from .errors import ConfigError

DIR_MODE = 0o700  # journals and locks are this user's business only
FILE_MODE = 0o600


def prepare(path: str) -> str:
    """Create ``path`` (0700) if missing; refuse one that anyone but us controls. Returns ``path``."""
    try:
        os.mkdir(path, DIR_MODE)
    except FileExistsError:
        pass
    except OSError as exc:
        raise ConfigError(f"--state-dir {path}: cannot create it: {exc.strerror or exc}") from None
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise ConfigError(f"--state-dir {path}: cannot read it: {exc.strerror or exc}") from None
    problem = refusal(st, os.geteuid())
    if problem:
        raise ConfigError(f"--state-dir {path}: {problem}; remove it (or point --state-dir at a directory "
                          "only this user can write) and start again")
    return path


def refusal(st: os.stat_result, uid: int) -> str | None:
    """Why a directory with ``st`` can't hold our state (None when it can)."""
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link"
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    if st.st_uid != uid:
        return f"is owned by uid {st.st_uid}, not by this user (uid {uid})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def open_regular(path: str, flags: int) -> int:
    """``os.open`` for a file of the state directory: no symlink followed, no FIFO waited on,
    and only a regular file of ours accepted (``OSError`` otherwise)."""
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, FILE_MODE)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(f"{path} is not a regular file")
        if st.st_uid != os.geteuid():
            raise OSError(f"{path} is owned by uid {st.st_uid}, not by this user")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd
