"""Workers do not outlive their supervisor: ``die_with_parent`` and the start-up check in ``worker_main``."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from pool.settings import BrokerSettings, PoolSettings
from pool.child import worker_main
from tests.helpers import ROOT

# A parent that forks a child armed with die_with_parent(SIGTERM), prints the child's pid once
# the child is armed, then sleeps until killed.
PARENT = """
import os, signal, sys, time
from pool.child import die_with_parent
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    die_with_parent(signal.SIGTERM)
    os.write(w, b"x")
    time.sleep(120)
    os._exit(0)
os.read(r, 1)
print(pid, flush=True)
time.sleep(120)
"""


def gone(pid: int) -> bool:
    """Exited (a zombie counts: nobody may reap orphans in a container)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if gone(pid):
            return True
        time.sleep(0.05)
    return False


@pytest.mark.timeout(30)
def test_the_child_gets_sigterm_when_its_parent_is_killed() -> None:
    # Given a parent whose child asked for SIGTERM on its parent's death
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True,
                              cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    child = int(parent.stdout.readline())
    try:
        # When the parent is killed without a chance to pass anything on
        parent.kill()
        parent.wait()
        # Then the child is gone too, promptly
        assert wait_gone(child, 10), "the child outlived its parent"
    finally:
        if not gone(child):
            os.kill(child, signal.SIGKILL)
        parent.stdout.close()


@pytest.mark.timeout(30)
def test_a_worker_whose_supervisor_is_already_gone_exits_at_once() -> None:
    # Given a worker started as if its supervisor had died before the worker could arm its parent-death
    # signal (its parent is not the pid it was told), with a broker it could only retry forever
    settings = PoolSettings(controllers=("tests.ctl_fixtures:Recorder",), workers=1, pin=False,
                            broker=BrokerSettings(amqp_url="amqp://guest:guest@127.0.0.1:1/%2F"))
    recv, send = multiprocessing.get_context("fork").Pipe(duplex=False)
    not_the_parent = os.getppid()
    proc = multiprocessing.get_context("fork").Process(target=worker_main,
                                                       args=(settings, 0, None, send, not_the_parent))
    # When it starts
    proc.start()
    send.close()
    proc.join(10)
    try:
        # Then it exits cleanly without starting to work (it never reported a state)
        assert proc.exitcode == 0
        with pytest.raises(EOFError):
            recv.recv_bytes()
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()
        recv.close()


def test_a_supervisor_whose_workers_cannot_load_their_controllers_stops_with_exit_2(tmp_path):
    # Given a Supervisor used from code (not `ctlpool run`, which checks controllers before
    # forking), configured with a controller whose module does not import
    script = (
        "import sys\n"
        "from pool.settings import PoolSettings\n"
        "from pool.supervisor import Supervisor\n"
        f"s = PoolSettings(controllers=('tests.no_such_module:X',), workers=2, pin=False, state_dir={str(tmp_path)!r},"
        " node_id='cfg-test')\n"
        "sys.exit(Supervisor(s).run())\n")
    # When it runs
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    # Then it stops at once with the configuration exit code, naming the reference, no crash loop
    out = r.stdout + r.stderr  # the workers log as configured (JSON on stdout)
    assert r.returncode == 2, out[-2000:]
    assert "tests.no_such_module" in out and "Traceback" not in out
    assert "died" not in out
