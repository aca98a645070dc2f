"""``pool.nodelock``: one supervisor per node id per host, and one line saying who holds it."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from pool import nodelock
from pool.errors import ConfigError


def test_acquire_creates_a_private_dir_and_records_the_holder(tmp_path: Path) -> None:
    # Given a state dir that does not exist yet
    state = tmp_path / "state"
    # When a node id is locked
    lock = nodelock.acquire(str(state), "web-1")
    try:
        # Then the dir is private, and the lock file names this process
        assert stat.S_IMODE(state.stat().st_mode) == 0o700
        assert (state / "web-1.lock").read_text() == f"{os.getpid()}\n"
        # and another node id on the same host is free
        nodelock.acquire(str(state), "web-2").release()
    finally:
        lock.release()


def test_a_held_node_id_is_refused_in_one_line_until_released(tmp_path: Path) -> None:
    # Given a node id locked by this process
    lock = nodelock.acquire(str(tmp_path), "web-1")
    # When it is locked again (a second open file: flock conflicts as with another process)
    with pytest.raises(ConfigError) as exc:
        nodelock.acquire(str(tmp_path), "web-1")
    # Then the error says which pid holds it and what to change
    assert str(exc.value) == (f"node id web-1 is in use on this host by ctlpool pid {os.getpid()} "
                              "(--node-id must be unique per host)")
    # When the holder releases it, it can be taken again
    lock.release()
    nodelock.acquire(str(tmp_path), "web-1").release()


def test_a_lock_held_by_the_workers_of_a_dead_supervisor_says_so(tmp_path: Path) -> None:
    # Given a lock whose recorded supervisor has exited while another process (a draining worker) holds it
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    lock = nodelock.acquire(str(tmp_path), "web-1")
    os.ftruncate(lock.fd, 0)
    os.pwrite(lock.fd, f"{dead}\n".encode(), 0)
    try:
        # When another supervisor tries
        with pytest.raises(ConfigError) as exc:
            nodelock.acquire(str(tmp_path), "web-1")
        # Then it hears that the supervisor is gone and which pids still hold the lock
        assert str(exc.value) == (f"node id web-1 is in use on this host by ctlpool pid {dead}, which has exited, "
                                  f"but its workers (pids {os.getpid()}) still hold the lock while they drain; "
                                  "start again once they are gone (--node-id must be unique per host)")
    finally:
        lock.release()


def test_an_unusable_state_dir_is_a_config_error_naming_the_flag(tmp_path: Path) -> None:
    # Given a state dir that cannot be created (its parent is a file; root may write anywhere else)
    parent = tmp_path / "file"
    parent.write_text("")
    state = parent / "state"
    # When a node id is locked there
    with pytest.raises(ConfigError) as exc:
        nodelock.acquire(str(state), "web-1")
    # Then one line names the flag, the directory and the reason
    message = str(exc.value)
    assert message.startswith(f"--state-dir {state}: cannot create the node-id lock {state}/web-1.lock: ")
    assert "Not a directory" in message and "\n" not in message
