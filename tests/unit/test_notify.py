"""Unit tests of pool.notify against real AF_UNIX datagram sockets (path and abstract namespace)."""

from __future__ import annotations

import os
import socket
import time
import uuid
from pathlib import Path

import pytest

from pool.notify import Notifier, forget_env


@pytest.fixture
def listener(tmp_path: Path):
    """A datagram socket bound to a path, like systemd's notify socket."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2)
    yield str(path), sock
    sock.close()


def lines(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().split("\n")


def test_each_call_sends_one_datagram_of_assignments(listener) -> None:
    # Given a notifier for a socket path
    path, sock = listener
    n = Notifier(path)
    # When it says ready with a status, then a status, then watchdog, then stopping
    assert n.ready("running: 2/2 workers ready")
    assert n.status("degraded: 1/2 workers ready")
    assert n.watchdog()
    assert n.stopping("draining")
    # Then systemd receives exactly those assignments, one datagram per call
    assert lines(sock) == ["READY=1", "STATUS=running: 2/2 workers ready"]
    assert lines(sock) == ["STATUS=degraded: 1/2 workers ready"]
    assert lines(sock) == ["WATCHDOG=1"]
    assert lines(sock) == ["STOPPING=1", "STATUS=draining"]
    n.close()


def test_reloading_carries_the_monotonic_time(listener) -> None:
    # Given a notifier
    path, sock = listener
    n = Notifier(path)
    # When it announces a reload
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    n.reloading()
    got = lines(sock)
    # Then RELOADING=1 comes with MONOTONIC_USEC, this host's CLOCK_MONOTONIC (systemd >= 253 requires it)
    assert got[0] == "RELOADING=1"
    assert got[1].startswith("MONOTONIC_USEC=") and int(got[1].split("=")[1]) >= before
    n.close()


def test_a_newline_in_the_status_does_not_start_a_new_assignment(listener) -> None:
    path, sock = listener
    # Given a status text with a newline in it
    # When sent
    Notifier(path).status("one\nREADY=1")
    # Then it stays one STATUS line
    assert lines(sock) == ["STATUS=one READY=1"]


def test_abstract_namespace_address() -> None:
    # Given a socket in the abstract namespace and NOTIFY_SOCKET=@name as systemd may pass it
    name = f"ctlpool-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2)
    try:
        n = Notifier.from_env({"NOTIFY_SOCKET": "@" + name})
        # When it notifies
        assert n.ready()
        # Then the datagram arrives there
        assert lines(sock) == ["READY=1"]
    finally:
        sock.close()


def test_without_notify_socket_everything_is_a_no_op() -> None:
    # Given no NOTIFY_SOCKET (not started by systemd)
    n = Notifier.from_env({})
    # When asked to notify
    # Then nothing is sent and nothing fails
    assert not n.enabled
    assert n.ready() is False and n.watchdog() is False and n.stopping() is False
    assert n.watchdog_s is None


def test_a_missing_socket_is_reported_not_raised(tmp_path: Path) -> None:
    # Given a NOTIFY_SOCKET path where nothing listens
    n = Notifier(str(tmp_path / "gone.sock"))
    # When notifying
    # Then it returns False instead of raising into the supervisor loop
    assert n.ready() is False


@pytest.mark.parametrize(
    ("env", "pid", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 42, 30.0),  # no WATCHDOG_PID: meant for us
        ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "42"}, 42, 2.0),
        ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "7"}, 42, None),  # meant for another process
        ({"WATCHDOG_USEC": "0"}, 42, None),
        ({"WATCHDOG_USEC": "soon"}, 42, None),
        ({}, 42, None),
    ],
)
def test_watchdog_interval_from_env(env: dict[str, str], pid: int, expected: float | None) -> None:
    # Given systemd's watchdog variables
    # When read for process `pid`
    n = Notifier.from_env({"NOTIFY_SOCKET": "/run/x", **env}, pid=pid)
    # Then the timeout is known only when it is meant for this process
    assert n.watchdog_s == expected


def test_forget_env_removes_the_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given the variables systemd sets
    for var, value in (("NOTIFY_SOCKET", "/run/x"), ("WATCHDOG_USEC", "1"), ("WATCHDOG_PID", "1")):
        monkeypatch.setenv(var, value)
    # When a worker forgets them
    forget_env()
    # Then none is left for code the worker loads
    assert not {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"} & set(os.environ)
