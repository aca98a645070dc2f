"""What an operator touches, against the real broker and real processes: systemd's notify protocol,
the metrics endpoint, and amqps:// with a CA and a client certificate.

``ctlpool run`` runs as a subprocess with ``NOTIFY_SOCKET`` pointing at a datagram socket the
test binds (as systemd would), ``--metrics-port`` on a free port, or a broker URL that goes
through a TLS-terminating proxy in front of the local RabbitMQ.
"""

from __future__ import annotations

import array
import asyncio
import os
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.ctl_fixtures import read_records
from tests.helpers import ROOT, Pool, ctlpool_cli, publish_many, queue_depth, wait_until

PARTITIONS = 8
WATCHDOG_USEC = 1_000_000  # 1 s: the supervisor pings every ~0.5 s


@pytest.fixture
def rec_dir(tmp_path: Path) -> Path:
    d = tmp_path / "rec"
    d.mkdir()
    return d


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NotifyListener:
    """systemd's side of sd_notify: a datagram socket recording (time, sender pid, assignments)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)  # sender pid, as NotifyAccess= checks
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, int, list[str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        creds = struct.calcsize("3i")
        while not self._stop.is_set():
            try:
                data, anc, _flags, _addr = self.sock.recvmsg(4096, socket.CMSG_SPACE(creds))
            except socket.timeout:
                continue
            pid = -1
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = array.array("i", payload[:creds])[0]
            self.messages.append((time.monotonic(), pid, data.decode().split("\n")))

    def times(self, assignment: str, since: float = 0.0) -> list[float]:
        return [t for t, _pid, lines in list(self.messages) if t >= since and assignment in lines]

    def wait_for(self, assignment: str, since: float = 0.0, timeout: float = 60) -> float:
        wait_until(lambda: bool(self.times(assignment, since)), timeout, what=assignment)
        return self.times(assignment, since)[0]

    def statuses(self, since: float = 0.0) -> list[str]:
        return [line[len("STATUS="):] for t, _pid, lines in list(self.messages) if t >= since
                for line in lines if line.startswith("STATUS=")]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def make_pool(url: str, prefix: str, tmp_path: Path, rec_dir: Path, *args: str, env: dict[str, str] | None = None,
              controllers: str = "tests.ctl_fixtures:Recorder") -> Pool:
    return Pool(url, prefix, controllers, "--workers", "2", "--partitions", str(PARTITIONS), *args,
                env={"CTLPOOL_TEST_RECORD_DIR": str(rec_dir), **(env or {})}, log_path=tmp_path / "pool.log")


@pytest.mark.timeout(150)
def test_sd_notify_ready_watchdog_reload_and_stop(amqp_url, prefix, tmp_path, rec_dir):
    # Given systemd's notify socket and a 1 s watchdog in the environment of `ctlpool run`
    listener = NotifyListener(tmp_path / "notify.sock")
    pool = make_pool(amqp_url, prefix, tmp_path, rec_dir,
                     env={"NOTIFY_SOCKET": listener.path, "WATCHDOG_USEC": str(WATCHDOG_USEC)})
    try:
        pool.start()
        # When every worker is consuming
        pool.wait_ready()
        ready_at = listener.wait_for("READY=1", timeout=10)
        # Then READY=1 came once, with a STATUS saying so; earlier STATUS lines said fewer were ready
        assert len(listener.times("READY=1")) == 1
        ready_msg = next(lines for t, _p, lines in listener.messages if "READY=1" in lines)
        assert "STATUS=running: 2/2 workers ready, 2 alive, 0 restarts" in ready_msg
        assert any("0/2 workers ready" in s for s in listener.statuses()), listener.statuses()

        # and WATCHDOG=1 comes every ~WATCHDOG_USEC/2 while the workers are healthy
        wait_until(lambda: len(listener.times("WATCHDOG=1", since=ready_at)) >= 3, 10, what="3 watchdog pings")
        pings = listener.times("WATCHDOG=1", since=ready_at)
        assert len(pings) >= 3, pings
        assert max(b - a for a, b in zip(pings, pings[1:])) < WATCHDOG_USEC / 1e6, pings

        # When one worker hangs (stopped: its event loop no longer reports)
        hung = pool.worker_pids()[0]
        os.kill(hung, signal.SIGSTOP)
        try:
            # Then the pings stop within the silence limit (10 s) and systemd would act on it
            wait_until(lambda: time.monotonic() - max(listener.times("WATCHDOG=1")) > 2.0, 20,
                       what="watchdog starved by a hung worker")
        finally:
            os.kill(hung, signal.SIGCONT)
        # and resume once it is back
        back = time.monotonic()
        listener.wait_for("WATCHDOG=1", since=back, timeout=10)
        pool.wait_ready()

        # When SIGHUP asks for a rolling restart
        before = set(pool.worker_pids())
        hup = time.monotonic()
        pool.signal(signal.SIGHUP)
        # Then RELOADING=1 (with MONOTONIC_USEC) comes first and READY=1 again once every worker is new
        reloading = listener.wait_for("RELOADING=1", since=hup, timeout=10)
        assert any(line.startswith("MONOTONIC_USEC=") for t, _p, lines in listener.messages if t == reloading
                   for line in lines)
        ready_again = listener.wait_for("READY=1", since=hup, timeout=90)
        assert ready_again > reloading
        assert not set(pool.worker_pids()) & before, "every worker was replaced"

        # When SIGTERM asks for a drain
        term = time.monotonic()
        code = pool.stop()
        # Then STOPPING=1 came, and the pool exited cleanly
        assert code == 0
        listener.wait_for("STOPPING=1", since=term, timeout=5)
        assert listener.statuses(since=term)[-1].startswith("draining: 0/2 workers ready, 0 alive")
        # and only the supervisor spoke (NotifyAccess=main would drop the workers' messages)
        assert {pid for _t, pid, _l in listener.messages} == {pool.proc.pid}
    finally:
        pool.kill()
        listener.close()


@pytest.mark.timeout(60)
def test_status_while_waiting_for_the_broker(prefix, tmp_path, rec_dir):
    # Given systemd's notify socket and a broker URL where nothing listens
    listener = NotifyListener(tmp_path / "notify.sock")
    pool = Pool("amqp://guest:secret@127.0.0.1:1/%2F", prefix, "tests.ctl_fixtures:Recorder",
                env={"CTLPOOL_TEST_RECORD_DIR": str(rec_dir), "NOTIFY_SOCKET": listener.path},
                log_path=tmp_path / "pool.log")
    try:
        pool.start()
        # When it starts
        wait_until(lambda: bool(listener.statuses()), 30, what="a STATUS line")
        # Then systemd's status says what it waits for (password redacted), and it is not READY
        status = listener.statuses()[0]
        assert status.startswith("waiting for the broker: cannot connect to RabbitMQ at amqp://guest:***@127.0.0.1:1/")
        assert "secret" not in status
        assert not listener.times("READY=1")
    finally:
        pool.kill()
        listener.close()


def scrape(port: int, path: str = "/metrics") -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def metrics(port: int) -> dict[str, float]:
    code, text = scrape(port)
    assert code == 200
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


@pytest.mark.timeout(120)
def test_metrics_endpoint_supervisor_view(amqp_url, prefix, tmp_path, rec_dir):
    # Given a pool serving metrics on a free port
    port = free_port()
    pool = make_pool(amqp_url, prefix, tmp_path, rec_dir, "--metrics-port", str(port))
    try:
        pool.start()
        pool.wait_ready()
        # When scraped
        wait_until(lambda: scrape(port, "/readyz")[0] == 200, 10, what="/readyz 200")
        got = metrics(port)
        # Then liveness, readiness and the worker gauges show a healthy pool
        assert scrape(port, "/livez") == (200, "ok\n")
        assert scrape(port, "/readyz") == (200, "running: 2/2 workers ready, 2 alive, 0 restarts\n")
        assert got['ctlpool_workers{state="ready"}'] == 2 and got["ctlpool_worker_restarts_total"] == 0
        # When a worker is killed
        os.kill(pool.worker_pids()[0], signal.SIGKILL)
        # Then the restart is counted and readiness follows the pool
        wait_until(lambda: metrics(port)["ctlpool_worker_restarts_total"] == 1, 20, what="restart counted")
        wait_until(lambda: metrics(port)['ctlpool_workers{state="ready"}'] == 2, 60, what="ready again")
        assert scrape(port, "/readyz")[0] == 200
    finally:
        assert pool.stop() == 0


def test_a_taken_metrics_port_is_a_config_error(amqp_url, prefix, tmp_path, rec_dir):
    # Given something already listening on the port
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        pool = make_pool(amqp_url, prefix, tmp_path, rec_dir, "--metrics-port", str(port))
        # When the pool starts
        pool.start()
        code = pool.proc.wait(60)
    # Then it exits 2 with one line naming the flag and the address
    assert code == 2
    assert f"--metrics-port {port}: cannot listen on 127.0.0.1:{port}" in (tmp_path / "pool.log").read_text()


@pytest.mark.timeout(150)
def test_metrics_match_what_the_pool_did(amqp_url, prefix, tmp_path, rec_dir):
    # Given a pool serving metrics, its controller parking after one failure
    port = free_port()
    pool = make_pool(amqp_url, prefix, tmp_path, rec_dir, "--metrics-port", str(port),
                     env={"CTLPOOL_TEST_MAX_ATTEMPTS": "1"})
    ok = 'controller_runtime_reconcile_total{controller="rec",result="success"}'
    err = 'controller_runtime_reconcile_total{controller="rec",result="error"}'
    adds = 'workqueue_adds_total{controller="rec",name="rec"}'

    def settled(expect_ok: int) -> bool:
        m = metrics(port)
        return m.get(ok, 0) == expect_ok and m.get('workqueue_depth{controller="rec",name="rec"}', -1) == 0

    try:
        pool.start()
        pool.wait_ready()
        # When 300 events for 100 keys, 2 invalid ones and a failing one are published
        events = [(f"k{i % 100}", {"n": i}) for i in range(300)]
        events += [("bad1", {"permanent": True}), ("bad2", {"permanent": True}), ("flaky", {"fail": 1})]
        publish_many(amqp_url, prefix, "rec", events)
        wait_until(lambda: queue_depth(amqp_url, f"{prefix}.rec.parked") == 3, 60, what="3 parked")
        # (the good keys may still be reconciling: count them once each key's last event is done)
        last = {f"k{j}": 200 + j for j in range(100)}
        wait_until(lambda: last.items() <= {(r["k"], r["n"]) for r in read_records(str(rec_dir)) if r["r"] == "ok"},
                   60, what="every key's last event reconciled")
        records = read_records(str(rec_dir))
        n_ok = sum(1 for r in records if r["r"] == "ok")
        wait_until(lambda: settled(n_ok), 20, what="metrics caught up")
        m = metrics(port)
        # Then the counts agree with what the controller recorded and what was published
        assert m[ok] == n_ok
        assert m[err] == sum(1 for r in records if r["r"] == "error") == 3
        assert m[adds] == len(events)
        assert m['ctlpool_events_coalesced_total{controller="rec"}'] == len(events) - len(records)
        assert m['ctlpool_parked_total{controller="rec",reason="permanent"}'] == 2
        assert m['ctlpool_parked_total{controller="rec",reason="max-attempts"}'] == 1
        assert m['ctlpool_partitions_owned{controller="rec"}'] == PARTITIONS
        assert m['controller_runtime_reconcile_time_seconds_count{controller="rec"}'] == len(records)
        assert m['workqueue_queue_duration_seconds_count{controller="rec",name="rec"}'] == len(records)
        assert m["ctlpool_publish_confirm_seconds_count"] >= 3, "the parked copies were confirmed"
        assert m['ctlpool_handovers_total{controller="rec",direction="acquired"}'] >= PARTITIONS
        # When a worker dies and its replacement handles more events
        os.kill(pool.worker_pids()[0], signal.SIGKILL)
        wait_until(lambda: metrics(port)["ctlpool_worker_restarts_total"] == 1, 20, what="restart counted")
        pool.wait_ready()
        wait_until(lambda: metrics(port).get('ctlpool_partitions_owned{controller="rec"}') == PARTITIONS, 30,
                   what="partitions owned again")
        publish_many(amqp_url, prefix, "rec", [(f"new{i}", {"n": i}) for i in range(50)])
        wait_until(lambda: sum(1 for r in read_records(str(rec_dir)) if r["r"] == "ok") >= n_ok + 50, 30)
        # Then the counters kept what the dead worker had counted and went on from there
        wait_until(lambda: settled(n_ok + 50), 20, what="metrics caught up after the restart")
        assert metrics(port)[adds] == len(events) + 50
    finally:
        assert pool.stop() == 0


# ---------------------------------------------------------------- amqps://

def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_certs(d: Path) -> None:
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate, all signed by it."""
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=ctlpool-test-ca",
            cwd=d)
    (d / "server.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name, ext in (("server", ("-extfile", "server.ext")), ("client", ())):
        openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN=ctlpool-{name}", cwd=d)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.crt", "-days", "2", *ext, cwd=d)


class TlsProxy:
    """TLS in front of the local RabbitMQ (which speaks plain AMQP here): requires a client certificate."""

    def __init__(self, certs: Path, upstream_port: int = 5672) -> None:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(certs / "ca.crt"))
        ctx.load_cert_chain(str(certs / "server.crt"), str(certs / "server.key"))
        ctx.verify_mode = ssl.CERT_REQUIRED
        self.upstream_port = upstream_port
        self.loop = asyncio.new_event_loop()
        self.loop.set_exception_handler(lambda loop, context: None)  # refused handshakes are expected
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=ctx), self.loop).result(10)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            except (ConnectionError, ssl.SSLError):
                pass
            finally:
                w.close()

        await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer), return_exceptions=True)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("certs")
    make_certs(d)
    return d


@pytest.mark.timeout(120)
def test_amqps_with_ca_and_client_certificate(amqp_url, prefix, tmp_path, rec_dir, certs):
    # Given a broker reachable only over TLS that requires a client certificate
    proxy = TlsProxy(certs)
    tls_url = f"amqps://guest:guest@localhost:{proxy.port}/%2F"
    tls = ("--tls-ca-file", str(certs / "ca.crt"), "--tls-cert-file", str(certs / "client.crt"),
           "--tls-key-file", str(certs / "client.key"))
    try:
        # When a command connects with the CA and the client certificate
        r = ctlpool_cli(tls_url, "topology", "rec", "--prefix", prefix, "--partitions", str(PARTITIONS), *tls)
        # Then it works
        assert r.returncode == 0, r.stderr
        # When the client certificate is missing
        r = ctlpool_cli(tls_url, "topology", "rec", "--prefix", prefix, "--partitions", str(PARTITIONS), *tls[:2])
        # Then the broker is unavailable (69), said in one line, password redacted
        assert r.returncode == 69
        assert f"amqps://guest:***@localhost:{proxy.port}" in r.stderr and ":guest@" not in r.stderr
        # When the CA does not vouch for the broker (the system CAs don't know this one)
        r = ctlpool_cli(tls_url, "topology", "rec", "--prefix", prefix, "--partitions", str(PARTITIONS))
        assert r.returncode == 69 and "CERTIFICATE_VERIFY_FAILED" in r.stderr
        # When TLS files are given with a plain amqp:// URL, that is a configuration error
        r = ctlpool_cli(amqp_url, "topology", "rec", "--prefix", prefix, *tls)
        assert r.returncode == 2 and "need an amqps:// broker URL" in r.stderr

        # When a whole pool runs over amqps (its workers inherit the TLS settings)
        pool = Pool(tls_url, prefix, "tests.ctl_fixtures:Recorder", "--workers", "2", "--partitions", str(PARTITIONS),
                    *tls, env={"CTLPOOL_TEST_RECORD_DIR": str(rec_dir)}, log_path=tmp_path / "pool.log")
        pool.start()
        try:
            pool.wait_ready()
            publish_many(amqp_url, prefix, "rec", [("over-tls", {"n": 1})])
            # Then it reconciles
            wait_until(lambda: any(x["k"] == "over-tls" for x in read_records(str(rec_dir))), 30, what="reconciled")
        finally:
            assert pool.stop() == 0
        # and neither its logs nor its command line carry the password
        assert ":guest@" not in (tmp_path / "pool.log").read_text()
        assert not any("guest" in a for a in pool.cmd)
    finally:
        proxy.close()


# ---------------------------------------------------------------- what the unit and the image rely on

# The kernel switch behind the unit's MemoryDenyWriteExecute=yes (PR_SET_MDWE, Linux >= 6.3),
# set before exec'ing the pool: no memory may become both writable and executable.
MDWE = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
    sys.exit(f"PR_SET_MDWE: {os.strerror(ctypes.get_errno())}")
os.execv(sys.argv[1], sys.argv[1:])
"""


@pytest.mark.timeout(90)
def test_pool_works_without_writable_executable_memory(amqp_url, prefix, tmp_path, rec_dir):
    probe = subprocess.run([sys.executable, "-c", MDWE, sys.executable, "-c",
                            "import mmap; mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)"],
                           capture_output=True, text=True, timeout=30)
    if "PR_SET_MDWE: Invalid argument" in probe.stderr:
        pytest.skip("this kernel has no PR_SET_MDWE (Linux < 6.3)")
    # Given a process where writable+executable memory is refused (as under MemoryDenyWriteExecute=yes)
    assert probe.returncode != 0 and "PermissionError" in probe.stderr, "the probe must be refused W+X memory"
    pool = make_pool(amqp_url, prefix, tmp_path, rec_dir)
    pool.cmd = [sys.executable, "-c", MDWE, *pool.cmd]
    try:
        # When the pool runs there (uvloop, orjson, msgspec, psutil pinning, pika)
        pool.start()
        pool.wait_ready()
        publish_many(amqp_url, prefix, "rec", [("mdwe", {"n": 1})])
        # Then it reconciles as usual
        wait_until(lambda: any(x["k"] == "mdwe" and x["r"] == "ok" for x in read_records(str(rec_dir))), 30)
    finally:
        assert pool.stop() == 0


@pytest.mark.timeout(90)
def test_docker_healthcheck_command(amqp_url, prefix, tmp_path, rec_dir):
    # Given the HEALTHCHECK command of the image, as its shell would run it
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    command = text.split("HEALTHCHECK", 1)[1].split(" CMD ", 1)[1].splitlines()[0].strip()
    port = free_port()
    # `python` on PATH, as in the image
    env = {**os.environ, "CTLPOOL_METRICS_PORT": str(port),
           "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}"}

    def check() -> int:
        return subprocess.run(["sh", "-c", command], env=env, capture_output=True, timeout=30).returncode

    # When no pool runs, it fails
    assert check() != 0
    pool = make_pool(amqp_url, prefix, tmp_path, rec_dir, env={"CTLPOOL_METRICS_PORT": str(port)})
    try:
        pool.start()
        pool.wait_ready()
        # When a pool configured by CTLPOOL_* variables runs, it passes
        assert check() == 0
    finally:
        assert pool.stop() == 0
