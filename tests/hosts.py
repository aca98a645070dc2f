"""Several supervisors on this machine as distinct hosts (``--node-id``) sharing one controller,
started and stopped by a test, all recording into one directory; and the checks every
scale-out or failover scenario ends with: balanced ownership, no overlap, nothing lost."""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path
from typing import Any

from pool.settings import BrokerSettings, TopologySettings
from pool.status import collect
from tests.ctl_fixtures import overlaps, read_records
from tests.helpers import Pool, queue_depth, wait_until
from tests.load import Load, assert_none_lost, backlog

P = 16
HEARTBEAT = "0.5"
TIMEOUT = 3.0  # --member-timeout-s
FAST = ("--heartbeat-interval-s", HEARTBEAT, "--member-timeout-s", str(TIMEOUT),
        "--workers", "2", "--no-pin", "--concurrency", "32")


class Hosts:
    """Hosts (one supervisor each) started and stopped by the test; all record into one directory."""

    def __init__(self, url: str, prefix: str, tmp: Path, partitions: int = P, ctl_node: tuple[str, ...] = ()) -> None:
        self.url, self.prefix, self.tmp, self.partitions = url, prefix, tmp, partitions
        self.ctl_node = ctl_node  # ("-n", NODE): which broker node rabbitmqctl asks (a cluster's)
        self.rec = tmp / "rec"
        self.rec.mkdir()
        self.hosts: dict[str, Pool] = {}
        self.timings: list[tuple[str, float]] = []

    def start(self, node: str, *extra: str) -> Pool:
        pool = Pool(self.url, self.prefix, "tests.ctl_fixtures:Recorder", *FAST, "--partitions", str(self.partitions),
                    "--node-id", node, *extra,
                    env={"CTLPOOL_TEST_RECORD_DIR": str(self.rec)}, log_path=self.tmp / f"{node}.log").start()
        self.hosts[node] = pool
        return pool

    def stop(self, node: str) -> None:
        assert self.hosts.pop(node).stop() == 0

    def kill(self, node: str) -> None:
        self.hosts.pop(node).kill()

    def shutdown(self) -> None:
        for node in list(self.hosts):
            self.hosts.pop(node).kill()

    def owners(self) -> dict[str, Any]:
        snap = asyncio.run(collect(BrokerSettings(amqp_url=self.url, prefix=self.prefix),
                                   TopologySettings(partitions=self.partitions), ["rec"], listen_s=1.2))
        return snap

    def balanced(self, workers: int) -> bool:
        """Exactly ``workers`` members; every partition has one owner; each owns P/workers ± 1."""
        snap = self.owners()
        members = snap["members"]
        if len(members) != workers:
            return False
        parts = snap["controllers"][0]["partitions"]
        if len(parts) != self.partitions or any(len(p["owner"]) != 1 for p in parts):
            return False  # (the count is the live layout's: a resize changes it)
        share = self.partitions / workers
        return all(abs(m["partitions"].get("rec", 0) - share) < 1 + 1e-9 for m in members)

    def wait_balanced(self, workers: int, what: str, timeout: float = 40) -> float:
        t = time.monotonic()
        wait_until(lambda: self.balanced(workers), timeout, interval=0.2, what=f"balanced: {what}")
        took = time.monotonic() - t
        self.timings.append((what, took))
        print(f"[timing] {what}: balanced after {took:.1f}s")
        return took

    def warnings(self, last: int = 40) -> str:
        """The last warnings and errors the hosts logged, oldest first (for a failure's message)."""
        lines = []
        for log in sorted(self.tmp.glob("*.log")):
            for line in log.read_text(errors="replace").splitlines():
                if not line.startswith('{"ts"') or '"level":"warning"' in line or '"level":"error"' in line:
                    lines.append(f"{log.stem}: {line[:400]}")
        return "\n".join(lines[-last:])

    def check(self, load: Load, drain_timeout: float = 90, also: Load | None = None) -> list[dict[str, Any]]:
        try:
            wait_until(lambda: backlog(self.url, self.prefix, partitions=self.partitions) == 0, drain_timeout,
                       what="backlog drained")
        except AssertionError as exc:  # say where the backlog sits, and who consumes there
            out = subprocess.run(["rabbitmqctl", "-q", *self.ctl_node, "list_queues", "name", "messages_ready",
                                  "messages_unacknowledged", "consumers"], capture_output=True, text=True, timeout=60)
            stuck = [line for line in out.stdout.splitlines() if line.startswith(self.prefix)
                     and line.split()[1:3] != ["0", "0"]]
            raise AssertionError(f"{exc}; queues holding messages (ready, unacked, consumers): {stuck}; "
                                 f"the hosts' last warnings:\n{self.warnings()}") from None
        for node in list(self.hosts):
            self.stop(node)
        records = read_records(str(self.rec))
        assert overlaps(records) == [], "two reconciles of one key overlapped"
        assert_none_lost(records, {**load.per_key, **(also.per_key if also is not None else {})})
        assert backlog(self.url, self.prefix, partitions=self.partitions) == 0, "nothing left unacked after the drain"
        assert queue_depth(self.url, f"{self.prefix}.rec.parked") == 0
        return records
