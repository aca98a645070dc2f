"""Process and identity faults, with real processes and real signals: a supervisor killed with
SIGKILL takes its workers with it, a node id runs once per host, and a publisher blocked by a
broker alarm says why it waits.

Each pool here gets its own ``--node-id`` and ``--state-dir`` (a temp dir), so these tests never
meet another pool on this host by accident.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import psutil
import pytest

from tests.ctl_fixtures import read_records
from tests.helpers import ROOT, Pool, ctlpool_cli, publish_many, queue_depth, wait_until

PARTITIONS = 8


@pytest.fixture
def rec_dir(tmp_path: Path) -> Path:
    d = tmp_path / "rec"
    d.mkdir()
    return d


@pytest.fixture
def node(tmp_path: Path) -> tuple[str, str]:
    """A node id nobody else uses, and a state dir of this test's own."""
    return f"node-{uuid.uuid4().hex[:8]}", str(tmp_path / "state")


def make_pool(url: str, prefix: str, tmp_path: Path, rec_dir: Path, node: tuple[str, str],
              log_name: str = "pool.log") -> Pool:
    node_id, state_dir = node
    return Pool(url, prefix, "tests.ctl_fixtures:Recorder", "--workers", "2", "--partitions", str(PARTITIONS),
                "--node-id", node_id, "--state-dir", state_dir,
                env={"CTLPOOL_TEST_RECORD_DIR": str(rec_dir)}, log_path=tmp_path / log_name)


def gone(pid: int) -> bool:
    """Exited (a zombie counts: nobody may reap orphans in a container)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def reconciled(rec_dir: Path, keys: set[str]) -> set[int]:
    """The pids that reconciled ``keys``, once all of them were (else empty)."""
    done = {r["k"]: r["pid"] for r in read_records(str(rec_dir)) if r["r"] == "ok" and r["k"] in keys}
    return set(done.values()) if len(done) == len(keys) else set()


def kill_group(pool: Pool) -> None:
    """SIGKILL whatever is left of the pool's process group (orphaned workers included)."""
    if pool.proc is None:
        return
    try:
        os.killpg(pool.proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    pool.proc.wait()


@pytest.mark.timeout(150)
def test_sigkill_of_the_supervisor_takes_its_workers_and_frees_the_node_id(amqp_url, prefix, tmp_path, rec_dir,
                                                                          node):
    # Given a running pool that reconciles, with one slow reconcile in flight
    pool = make_pool(amqp_url, prefix, tmp_path, rec_dir, node).start()
    pool2 = make_pool(amqp_url, prefix, tmp_path, rec_dir, node, log_name="pool2.log")
    try:
        pool.wait_ready()
        before = {f"before-{i}" for i in range(20)}
        publish_many(amqp_url, prefix, "rec", [(k, {"n": 1}) for k in before])
        wait_until(lambda: reconciled(rec_dir, before), 30, what="reconciled before the kill")
        workers = pool.worker_pids()
        assert len(workers) == 2
        publish_many(amqp_url, prefix, "rec", [("slow", {"sleep_ms": 1500, "mark_start": True})])
        wait_until(lambda: any(r["k"] == "slow" for r in read_records(str(rec_dir))), 30, what="slow one started")

        # When the supervisor alone is killed with SIGKILL (no chance to pass anything on)
        pool.signal(signal.SIGKILL)
        pool.proc.wait()

        # Then every worker exits within the deadline, draining (the kernel's SIGTERM): the slow one finished
        wait_until(lambda: all(gone(p) for p in workers), 20, what=f"orphaned workers {workers} to exit")
        assert reconciled(rec_dir, {"slow"}), "the reconcile in flight was finished before its worker exited"

        # When a new pool with the same node id starts on this host
        pool2.start()
        pool2.wait_ready()
        after = {f"after-{i}" for i in range(20)}
        publish_many(amqp_url, prefix, "rec", [(k, {"n": 2}) for k in after])

        # Then it reconciles the new events, with its own workers
        wait_until(lambda: reconciled(rec_dir, after), 30, what="reconciled by the new pool")
        assert reconciled(rec_dir, after) <= set(pool2.worker_pids())
    finally:
        kill_group(pool)
        if pool2.proc is not None:
            assert pool2.stop() == 0


@pytest.mark.timeout(120)
def test_a_second_pool_with_the_same_node_id_refuses_to_start(amqp_url, prefix, tmp_path, rec_dir, node):
    # Given a running pool
    pool = make_pool(amqp_url, prefix, tmp_path, rec_dir, node).start()
    try:
        pool.wait_ready()
        node_id, state_dir = node

        # When a second `ctlpool run` starts on this host with the same node id
        r = ctlpool_cli(amqp_url, "run", "--controllers", "tests.ctl_fixtures:Recorder", "--prefix", prefix,
                        "--partitions", str(PARTITIONS), "--workers", "1", "--log-format", "text",
                        "--log-level", "warning", "--node-id", node_id, "--state-dir", state_dir,
                        "--drain-timeout-s", "5")

        # Then it exits 2 with one line naming the node id and the pid that has it
        assert r.returncode == 2, r.stderr
        assert r.stderr == (f"ctlpool: error: node id {node_id} is in use on this host by ctlpool pid "
                            f"{pool.proc.pid} (--node-id must be unique per host)\n")
        # and the first pool runs on, untouched
        assert pool.proc.poll() is None and len(pool.worker_pids()) == 2

        # When the state dir cannot be written
        bad = tmp_path / "a-file" / "state"
        (tmp_path / "a-file").write_text("")
        r = ctlpool_cli(amqp_url, "run", "--controllers", "tests.ctl_fixtures:Recorder", "--prefix", prefix,
                        "--partitions", str(PARTITIONS), "--log-level", "warning", "--node-id", "other",
                        "--state-dir", str(bad))
        # Then it exits 2 with one line naming the flag and the directory
        assert r.returncode == 2, r.stderr
        assert r.stderr.count("\n") == 1
        assert r.stderr.startswith(f"ctlpool: error: --state-dir {bad}: cannot create it"), r.stderr
    finally:
        assert pool.stop() == 0


@pytest.mark.timeout(120)
def test_a_pool_with_the_same_node_id_elsewhere_stops_the_later_one(amqp_url, prefix, tmp_path, rec_dir, node):
    # Given a running pool
    pool = make_pool(amqp_url, prefix, tmp_path, rec_dir, node).start()
    other = make_pool(amqp_url, prefix, tmp_path, rec_dir, (node[0], str(tmp_path / "other-state")),
                      log_name="other.log")
    try:
        pool.wait_ready()
        # When a second pool announces the same member ids from another state dir (as another host would)
        other.start()
        code = other.run.proc.wait(60)
        # Then the later one exits 2 before taking any partition, one ERROR line saying why
        assert code == 2
        said = [e["msg"] for e in other.logs() if e["level"] == "error" and "already live" in e["msg"]]
        assert said and all("--node-id must be unique" in m for m in said)
        assert not [e for e in other.logs() if "consuming" in e["msg"]]
        # and the first runs on, consuming every partition, untouched
        assert pool.proc.poll() is None and len(pool.worker_pids()) == 2
        publish_many(amqp_url, prefix, "rec", [(f"k{i}", {"n": 1}) for i in range(20)])
        wait_until(lambda: reconciled(rec_dir, {f"k{i}" for i in range(20)}) <= set(pool.worker_pids())
                   and reconciled(rec_dir, {f"k{i}" for i in range(20)}), 30, what="the first pool reconciles")
    finally:
        kill_group(other)
        assert pool.stop() == 0


@pytest.mark.timeout(120)
def test_a_state_dir_removed_under_a_running_pool_is_locked_again(amqp_url, prefix, tmp_path, rec_dir, node):
    import shutil

    node_id, state_dir = node
    pool = make_pool(amqp_url, prefix, tmp_path, rec_dir, node).start()
    try:
        pool.wait_ready()
        # When a temp-directory cleaner removes the state dir under the running pool
        shutil.rmtree(state_dir)
        # Then the supervisor takes the lock again within a couple of seconds, and says so
        lock = Path(state_dir) / f"{node_id}.lock"
        wait_until(lambda: lock.exists() and lock.read_text() == f"{pool.proc.pid}\n", 10, what="the lock again")
        wait_until(lambda: any("took it again" in e["msg"] for e in pool.logs()), 10, what="the warning")
        # and a second pool with the same node id and state dir is refused, as before the cleaner
        r = ctlpool_cli(amqp_url, "run", "--controllers", "tests.ctl_fixtures:Recorder", "--prefix", prefix,
                        "--partitions", str(PARTITIONS), "--log-level", "warning", "--node-id", node_id,
                        "--state-dir", state_dir)
        assert r.returncode == 2 and "is in use on this host" in r.stderr, r.stderr
    finally:
        assert pool.stop() == 0


@pytest.mark.timeout(150)
def test_journals_the_state_dir_cannot_hold_live_in_memory_and_poison_is_still_parked(amqp_url, prefix, tmp_path,
                                                                                     rec_dir, node):
    # Given a state dir where the journal files can't be made (a FIFO and a directory squat their names)
    node_id, state_dir = node
    os.makedirs(state_dir, mode=0o700)
    os.mkfifo(os.path.join(state_dir, f"{node_id}-0.inflight"))
    os.mkdir(os.path.join(state_dir, f"{node_id}-1.inflight"))
    pool = make_pool(amqp_url, prefix, tmp_path, rec_dir, node).start()
    try:
        # When the pool starts: one WARNING, and it runs (it neither hangs on the FIFO nor refuses)
        pool.wait_ready()
        warned = [e for e in pool.logs() if "keeping them in memory" in e["msg"]]
        assert len(warned) == 1 and warned[0]["level"] == "warning"
        # and an event kills whichever worker reconciles it
        publish_many(amqp_url, prefix, "rec", [("killer", {"n": 1, "crash": True}), ("fine", {"n": 1})])
        wait_until(lambda: queue_depth(amqp_url, f"{prefix}.rec.parked") == 1, 90, what="the killer parked")
    finally:
        assert pool.stop() == 0
    # Then it was parked after exactly --max-deliveries (3) deaths, not the broker's 20
    deaths = [e for e in pool.logs() if e["logger"] == "ctlpool.supervisor" and "died (exit" in e["msg"]]
    assert len(deaths) == 3, [e["msg"] for e in deaths]
    from tests.helpers import get_all

    [(_m, props, _b)] = get_all(amqp_url, f"{prefix}.rec.parked")
    assert props.headers["x-ctlpool-reason"] == "too-many-deliveries"
    assert reconciled(rec_dir, {"fine"})


@pytest.mark.timeout(60)
def test_a_default_state_dir_planted_by_someone_else_is_refused(amqp_url, prefix, tmp_path):
    # Given the default state dir's name in the temp directory, made first: a symlink to elsewhere
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp / f"ctlpool-{os.getuid()}")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("CTLPOOL_") and k not in ("RUNTIME_DIRECTORY", "XDG_RUNTIME_DIR")}
    env.update(CTLPOOL_AMQP_URL=amqp_url, PYTHONPATH=str(ROOT), TMPDIR=str(tmp))
    # When a pool starts with the default state dir
    r = subprocess.run([sys.executable, "-m", "pool.cli", "run", "--controllers", "tests.ctl_fixtures:Recorder",
                        "--prefix", prefix, "--partitions", str(PARTITIONS), "--log-level", "warning"],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    # Then it refuses in one line, and wrote nothing where the link points
    assert r.returncode == 2, r.stderr
    assert r.stderr == (f"ctlpool: error: --state-dir {tmp}/ctlpool-{os.getuid()}: is a symbolic link; remove it "
                        "(or point --state-dir at a directory only this user can write) and start again\n")
    assert os.listdir(tmp_path / "elsewhere") == []


def memory_watermark() -> str:
    """The broker's current vm_memory_high_watermark as set_vm_memory_high_watermark takes it."""
    out = subprocess.run(["rabbitmqctl", "-q", "eval", "vm_memory_monitor:get_vm_memory_high_watermark()."],
                         capture_output=True, text=True, timeout=60, check=True).stdout.strip()
    m = re.fullmatch(r"\{absolute,(\d+)\}", out)
    if m:
        return f"absolute {m.group(1)}"
    float(out)  # a fraction such as 0.4; anything else would not restore
    return out


def set_memory_watermark(value: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", "set_vm_memory_high_watermark", *value.split()], capture_output=True,
                   timeout=60, check=True)


@pytest.mark.timeout(120)
def test_publish_says_why_it_waits_while_the_broker_blocks_it(amqp_url, prefix):
    # Given a controller's topology and `ctlpool publish --batch` reading events from a pipe
    assert ctlpool_cli(amqp_url, "topology", "rec", "--prefix", prefix, "--partitions", "2").returncode == 0
    env = {**os.environ, "CTLPOOL_AMQP_URL": amqp_url, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "pool.cli", "publish", "rec", "--batch", "--prefix", prefix],
                            env=env, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    stderr: list[str] = []
    reader = threading.Thread(target=lambda: stderr.extend(iter(proc.stderr.readline, "")), daemon=True)
    reader.start()
    proc.stdin.write("".join(f"k{i}\t{{\"n\": {i}}}\n" for i in range(50)))
    proc.stdin.flush()
    watermark = memory_watermark()
    try:
        # When a memory alarm goes off on the broker (kept short: other tests share it) while it publishes
        set_memory_watermark("0.0000001")
        proc.stdin.close()
        # Then it says, in one line, that the broker blocks it and why, and waits
        wait_until(lambda: any(line.startswith("broker blocked publishing: ") for line in stderr), 8,
                   what="the blocked line")
        assert [line for line in stderr if line.startswith("broker blocked")] == [
            "broker blocked publishing: low on memory; waiting (memory or disk alarm on the broker)\n"]
        assert proc.poll() is None
    finally:
        # (restored however the test went)
        set_memory_watermark(watermark)
    # When the alarm ends
    # Then it says so and finishes the batch, every event confirmed
    assert proc.wait(30) == 0, "".join(stderr)
    reader.join(5)
    assert any(re.fullmatch(r"broker unblocked publishing after \d+\.\ds; continuing\n", line) for line in stderr), \
        stderr
    assert proc.stdout.read() == f"published 50 events to {prefix}.rec\n"
    assert sum(queue_depth(amqp_url, f"{prefix}.rec.p{i:03d}") for i in range(2)) == 50


def consumers_by_connection(prefix: str) -> dict[str, list[str]]:
    """Partition queue -> the connection names (``ctlpool <member> consume``) consuming it, as the broker sees it."""
    def rows(*cmd: str) -> list[list[str]]:
        out = subprocess.run(["rabbitmqctl", "-q", *cmd], capture_output=True, text=True, timeout=60,
                             check=True).stdout
        return [line.split("\t") for line in out.splitlines() if line.strip()]

    conn_name = {pid: re.search(r'"connection_name","([^"]*)"', props).group(1) if "connection_name" in props else ""
                 for pid, props in rows("list_connections", "pid", "client_properties")}
    channel_conn = {pid: conn for pid, conn in rows("list_channels", "pid", "connection")}
    out: dict[str, list[str]] = {}
    for queue, channel in rows("list_consumers", "queue_name", "channel_pid"):
        if queue.startswith(f"{prefix}.rec.p"):
            out.setdefault(queue, []).append(conn_name.get(channel_conn.get(channel, ""), "?"))
    return out


@pytest.mark.timeout(180)
def test_after_a_memory_alarm_every_partition_has_one_consumer_and_status_says_which(
        amqp_url, prefix, tmp_path, rec_dir, node):
    # Given a pool of 2 workers consuming every partition, under a light load
    pool = make_pool(amqp_url, prefix, tmp_path, rec_dir, node).start()
    watermark = memory_watermark()
    try:
        pool.wait_ready()
        publish_many(amqp_url, prefix, "rec", [(f"k{i}", {"n": 1}) for i in range(100)])
        # When the broker raises a memory alarm for 8 s (longer than the member timeout: the
        # workers' heartbeats stop reaching each other) and then clears it
        try:
            set_memory_watermark("0.0000001")
            wait_until(lambda: any("broker blocked publishing" in e["msg"] for e in pool.logs()), 30,
                       what="the workers log the block")
            # Then the block is logged, and `ctlpool status` says it
            st = ctlpool_cli(amqp_url, "status", "--prefix", prefix, "--partitions", str(PARTITIONS),
                             "--listen-s", "1.5", "--json")
            assert st.returncode == 0, st.stderr
            assert json.loads(st.stdout)["broker_blocked"] == "low on memory"
            time.sleep(8)  # the alarm's duration: the fault itself, not a synchronisation
        finally:
            set_memory_watermark(watermark)
        wait_until(lambda: any("broker unblocked publishing" in e["msg"] for e in pool.logs()), 30,
                   what="the workers log the end of the block")

        # And afterwards each partition is consumed by exactly one connection, the one of the
        # member `ctlpool status` names as its owner (no channel left behind, none untracked)
        def settled() -> bool:
            real = consumers_by_connection(prefix)
            st = ctlpool_cli(amqp_url, "status", "--prefix", prefix, "--partitions", str(PARTITIONS),
                             "--listen-s", "1.5", "--json")
            parts = json.loads(st.stdout)["controllers"][0]["partitions"]
            return len(real) == PARTITIONS and all(
                len(p["owner"]) == 1 and real[p["queue"]] == [f"ctlpool {p['owner'][0]} consume"] for p in parts)
        wait_until(settled, 60, interval=1.0, what="one consumer per partition, the one status names")
        publish_many(amqp_url, prefix, "rec", [(f"after{i}", {"n": 1}) for i in range(50)])
        wait_until(lambda: {f"after{i}" for i in range(50)} <= {r["k"] for r in read_records(str(rec_dir))}, 60,
                   what="events after the alarm reconciled")
    finally:
        assert pool.stop() == 0
