"""systemd's notify protocol (sd_notify), without a dependency.

Data flow: with ``Type=notify`` systemd passes ``NOTIFY_SOCKET`` (a path, or ``@name`` for
the abstract namespace) and, with ``WatchdogSec=``, ``WATCHDOG_USEC`` (and ``WATCHDOG_PID``).
``Notifier.from_env()`` reads them once; each ``notify(...)`` sends one datagram of
newline-separated ``VAR=value`` assignments to that socket. Without ``NOTIFY_SOCKET``
(not under systemd) every call is a no-op, so callers never check.

The supervisor is the only sender (``NotifyAccess=main``): it says ``READY=1`` once every
worker consumes, ``WATCHDOG=1`` every ``watchdog_s / 2`` while its workers are healthy,
``STATUS=`` with a one-line summary when that changes, ``RELOADING=1`` on SIGHUP (then
``READY=1`` when the rolling restart is done) and ``STOPPING=1`` when it drains. Workers
drop the variables (``forget_env``) so nothing they load can speak for the service.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Mapping

ENV_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class Notifier:
    """Sends notify messages to ``address`` (``None``: sends nothing)."""

    def __init__(self, address: str | None, *, watchdog_s: float | None = None) -> None:
        self.address = address or None
        self.watchdog_s = watchdog_s
        """systemd's watchdog timeout (``WatchdogSec=``) if enabled for this process, else ``None``."""
        self._sock: socket.socket | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, pid: int | None = None) -> "Notifier":
        """From ``NOTIFY_SOCKET`` / ``WATCHDOG_USEC`` / ``WATCHDOG_PID`` (the watchdog only if meant for ``pid``)."""
        env = os.environ if env is None else env
        pid = os.getpid() if pid is None else pid
        watchdog_s = None
        usec = env.get("WATCHDOG_USEC", "")
        target = env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not target or target == str(pid)):
            watchdog_s = int(usec) / 1e6
        return cls(env.get("NOTIFY_SOCKET"), watchdog_s=watchdog_s)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *assignments: str) -> bool:
        """Send ``VAR=value`` lines as one datagram; False (never raises) when it could not be sent."""
        if self.address is None:
            return False
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto("\n".join(assignments).encode(), target)
            return True
        except OSError:
            return False  # systemd went away or the socket is wrong: nothing useful to do about it

    def ready(self, status: str | None = None) -> bool:
        return self.notify("READY=1", *_status(status))

    def reloading(self, status: str | None = None) -> bool:
        # systemd >= 253 wants the monotonic time with RELOADING=1; older ones ignore it
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}", *_status(status))

    def stopping(self, status: str | None = None) -> bool:
        return self.notify("STOPPING=1", *_status(status))

    def status(self, text: str) -> bool:
        return self.notify(*_status(text))

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _status(text: str | None) -> tuple[str, ...]:
    # one line: a newline would start a new assignment
    return () if text is None else ("STATUS=" + text.replace("\n", " "),)


def forget_env() -> None:
    """Remove the notify variables from this process (a worker) so it cannot speak for the service."""
    for var in ENV_VARS:
        os.environ.pop(var, None)
