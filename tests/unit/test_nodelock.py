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
    assert message == f"--state-dir {state}: cannot create it: Not a directory"


@pytest.mark.parametrize("plant", ["symlink to a dir", "other owner", "group writable", "a file"])
def test_a_state_dir_someone_else_controls_is_refused_in_one_line(tmp_path: Path, plant: str) -> None:
    # Given the default-style state dir, made first by someone else in a shared temp dir
    state = tmp_path / "ctlpool-0"
    if plant == "symlink to a dir":
        (tmp_path / "elsewhere").mkdir()
        os.symlink(tmp_path / "elsewhere", state)
    elif plant == "a file":
        state.write_text("")
    else:
        state.mkdir(mode=0o700)
        if plant == "other owner":
            os.chown(state, 4242, 4242)
        else:
            os.chmod(state, 0o770)
    # When a pool locks its node id there
    with pytest.raises(ConfigError) as exc:
        nodelock.acquire(str(state), "web-1")
    # Then it refuses in one line that says why and what to do, and created nothing there
    message = str(exc.value)
    assert message.startswith(f"--state-dir {state}: ") and "remove it" in message and "\n" not in message
    if plant != "a file":
        assert not os.path.exists(os.path.join(os.path.realpath(state), "web-1.lock"))


@pytest.mark.parametrize("plant", ["symlink", "fifo"])
def test_a_planted_lock_file_is_refused_never_followed_or_waited_on(tmp_path: Path, plant: str) -> None:
    # Given a private state dir whose lock path someone planted (a symlink to a victim, a FIFO)
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    victim = tmp_path / "victim"
    victim.write_text("precious")
    if plant == "symlink":
        os.symlink(victim, state / "web-1.lock")
    else:
        os.mkfifo(state / "web-1.lock")
    # When a pool locks its node id: refused at once (a FIFO would block an ordinary open)
    with pytest.raises(ConfigError):
        nodelock.acquire(str(state), "web-1")
    assert victim.read_text() == "precious"


def test_a_lock_file_removed_under_the_pool_is_taken_again(tmp_path: Path) -> None:
    # Given a held node-id lock
    state = tmp_path / "state"
    lock = nodelock.acquire(str(state), "web-1")
    try:
        assert lock.check() is False  # all well: nothing done
        # When a cleaner removes the whole state directory
        import shutil

        shutil.rmtree(state)
        # Then the next check takes the lock afresh, at the same path, in a private directory
        assert lock.check() is True
        assert (state / "web-1.lock").read_text() == f"{os.getpid()}\n"
        assert stat.S_IMODE(state.stat().st_mode) == 0o700
        # and a second pool with the same node id is refused again
        with pytest.raises(ConfigError):
            nodelock.acquire(str(state), "web-1")
    finally:
        lock.release()


def test_a_lock_file_replaced_by_another_holder_stops_the_first(tmp_path: Path) -> None:
    # Given a held lock whose file was removed, and another pool that locked the new file first
    state = tmp_path / "state"
    lock = nodelock.acquire(str(state), "web-1")
    os.unlink(state / "web-1.lock")
    other = nodelock.acquire(str(state), "web-1")
    try:
        # When the first one checks: it cannot run unlocked, it says so
        with pytest.raises(ConfigError):
            lock.check()
    finally:
        other.release()
        lock.release()
