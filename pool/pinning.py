"""Whether the supervisor pins its workers to CPUs (``--pin auto|true|false``).

Pinning worker i to CPU i keeps each worker's caches warm and stops workers from piling onto
one core, which is what a host running only ctlpool wants. A RabbitMQ node on the same host
changes that: its Erlang schedulers are bound to CPUs too (RabbitMQ's default scheduler
binding), and the kernel handles the broker's loopback traffic and disk writes on some CPU.
A pinned worker cannot step away from a core the broker is busy on; it waits on that core's
run queue while the other one idles. Measured with ``python -m bench latency`` on a 2-core
host with the broker local (bench/README.md): the pinned pool's p99 was about twice the
unpinned pool's, most of it run-queue wait of the worker on the broker's busier core.

So ``auto`` (the default) pins unless the broker runs here: the AMQP URL's host is one of
this host's addresses (loopback included), or a RabbitMQ server process (``beam.smp``) is
visible on this host. ``decide`` is pure; ``local_facts`` gathers what it looks at.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

BROKER_PROCESS = "beam.smp"  # the Erlang VM that runs a RabbitMQ node


@dataclass(frozen=True)
class LocalFacts:
    """What ``auto`` looks at: the broker URL's host, what it resolves to, this host's addresses."""

    broker_host: str
    broker_addrs: frozenset[str]
    local_addrs: frozenset[str]
    broker_pid: int | None  # a local ``beam.smp`` process, if one is visible


def decide(mode: bool | None, facts: LocalFacts | None) -> tuple[bool, str]:
    """``(pin?, why)`` for ``--pin`` ``mode`` (None = auto); ``facts`` is only needed for auto."""
    if mode is not None:
        return mode, f"--pin {'true' if mode else 'false'}"
    assert facts is not None
    local = sorted(a for a in facts.broker_addrs if a in facts.local_addrs or ipaddress.ip_address(a).is_loopback)
    why = "; a pinned worker could not move off a CPU the broker is busy on (--pin true pins anyway)"
    if local:
        shown = facts.broker_host if local[0] == facts.broker_host else f"{facts.broker_host}: {local[0]}"
        return False, f"the broker runs on this host ({shown}){why}"
    if facts.broker_pid is not None:
        return False, f"a RabbitMQ node runs on this host ({BROKER_PROCESS}, pid {facts.broker_pid}){why}"
    return True, f"the broker ({facts.broker_host}) is on another host"


def _addr(a: str) -> str:
    return str(ipaddress.ip_address(a.split("%", 1)[0]))  # drop an IPv6 scope ("fe80::1%eth0")


def local_facts(amqp_url: str) -> LocalFacts:
    """Resolve the broker's host and list this host's addresses and RabbitMQ process (psutil)."""
    import psutil

    host = urlsplit(amqp_url).hostname or "localhost"
    try:
        broker = frozenset(_addr(str(info[4][0])) for info in socket.getaddrinfo(host, None))
    except (OSError, ValueError):
        broker = frozenset()  # unresolvable now: the workers' connect reports it; not local as far as we know
    mine: set[str] = set()
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family in (socket.AF_INET, socket.AF_INET6):
                try:
                    mine.add(_addr(a.address))
                except ValueError:
                    continue
    pid = None
    try:
        for p in psutil.process_iter(["name"]):
            if p.info["name"] == BROKER_PROCESS:
                pid = p.pid
                break
    except psutil.Error:
        pass  # processes hidden from us (hidepid, ProtectProc): rely on the address check
    return LocalFacts(host, broker, frozenset(mine), pid)
