"""``ctlpool doctor``: is the broker there, with the consistent-hash plugin? ``--fix`` makes it so locally.

Data flow: try to connect (BlockingConnection, one attempt). Unreachable and the URL points
at this host -> with ``--fix`` start the installed broker (``rabbitmq-server -detached``) and
wait for it; not installed -> print the install command. Then probe the plugin by declaring
a throwaway ``x-consistent-hash`` exchange on a throwaway connection (a missing plugin
closes the whole connection on 3.10, DESIGN fact 7) -> with ``--fix`` enable it
(``rabbitmq-plugins enable``, no restart needed). Each step prints one line. A comma-separated
list of URLs (a cluster) is checked node by node: the plugin must be on every node; then the
cluster's nodes and any of our quorum queues with replicas offline are listed (``pool.replicas``,
through rabbitmqctl; warnings only). Last, the broker's queue budget (``pool.budget``): how many
more queues its file handles allow, and plainly when there is no room left (a broker past it
only times out handshakes). URLs are printed only through ``redact_url``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import uuid
from urllib.parse import urlsplit

import pika
import pika.exceptions

from . import budget, replicas
from .tls import url_parameters
from .errors import PluginMissing
from .text import escape
from .urls import redact_url, split_urls

INSTALL_HINT = "apt-get install -y rabbitmq-server   (Debian/Ubuntu; then: rabbitmq-server -detached)"
START_COMMAND = ["rabbitmq-server", "-detached"]
ENABLE_COMMAND = ["rabbitmq-plugins", "enable", "rabbitmq_consistent_hash_exchange"]
START_WAIT_S = 90.0  # a cold RabbitMQ boot on a small VM takes 5-30 s


def _reachable(url: str) -> bool:
    params = url_parameters(url)
    params.connection_attempts = 1
    params.socket_timeout = 3
    try:
        pika.BlockingConnection(params).close()
        return True
    except pika.exceptions.AMQPError:
        return False


def _plugin_enabled(url: str) -> bool:
    conn = pika.BlockingConnection(url_parameters(url))
    name = f"ctlpool.probe.{uuid.uuid4().hex[:8]}"
    try:
        ch = conn.channel()
        ch.exchange_declare(name, "x-consistent-hash", auto_delete=True)
        ch.exchange_delete(name)
        return True
    except (pika.exceptions.ConnectionClosed, pika.exceptions.ChannelClosed) as exc:
        if "x-consistent-hash" in str(exc) or getattr(exc, "reply_code", 0) in (503, 406):
            return False
        raise
    finally:
        if conn.is_open:
            conn.close()


def _local(url: str) -> bool:
    return (urlsplit(url).hostname or "") in ("localhost", "127.0.0.1", "::1")


def _sbin(cmd: list[str]) -> list[str] | None:
    exe = shutil.which(cmd[0]) or shutil.which(cmd[0], path="/usr/sbin:/usr/lib/rabbitmq/bin")
    return [exe, *cmd[1:]] if exe else None


def doctor(url: str, fix: bool, admin_node: str | None = None, prefix: str = "ctl") -> int:
    """Returns 0 when the broker (every node of a list) is usable, 69 (EX_UNAVAILABLE) when not."""
    worst = max(_check_node(node.strip(), fix) for node in split_urls(url))
    if len(split_urls(url)) > 1 or admin_node:
        _check_cluster(url, admin_node, prefix)
    _check_budget(url, admin_node)
    return worst


def _check_budget(url: str, admin_node: str | None) -> None:
    try:
        room = budget.read(admin_node, url)
    except replicas.Unavailable as exc:
        print(escape(f"budget: not checked: {exc}"))
        return
    if room.queues_left() == 0:
        print(escape(f"budget: NO ROOM LEFT on {room.node}: {room.describe()}; new connections will time out. Delete "
                     "queues (rabbitmqctl delete_queue, ctlpool topology delete) or raise the broker's LimitNOFILE"))
    else:
        print(escape(f"budget: {room.node}: {room.describe()} (a controller takes its partitions + 8 queues)"))


def _check_cluster(url: str, admin_node: str | None, prefix: str) -> None:
    """A cluster: its nodes, and our quorum queues with replicas offline (warnings: the broker still serves)."""
    try:
        nodes = replicas.nodes(admin_node, url)
        queues = replicas.read(admin_node, url)
    except replicas.Unavailable as exc:
        print(escape(f"cluster: not checked: {exc}"))
        return
    print(escape(f"cluster: {len(nodes.running)} nodes running: {', '.join(nodes.running)}"
                 + (f"; NOT RUNNING: {', '.join(nodes.stopped)}" if nodes.stopped else "")))
    under = replicas.under_replicated(queues, prefix)
    ours = sum(1 for q in queues if q.startswith(prefix + "."))
    if under:
        print(escape(f"replicas: WARNING: {len(under)} of {ours} quorum queues under {prefix}. have replicas "
                     f"offline (online/members): {', '.join(under[:8])}{' ...' if len(under) > 8 else ''}; "
                     "bring the nodes back (rabbitmqctl -n NODE start_app)"))
    else:
        print(f"replicas: all {ours} quorum queues under {prefix}. have every replica online")


def _dev_node(url: str) -> bool:
    """A node of the local dev cluster (``pool.devcluster``, ``make cluster``)?"""
    from .devcluster.nodes import NODES

    return _local(url) and urlsplit(url).port in {n.amqp_port for n in NODES}


def _fix_dev_cluster() -> bool:
    """``--fix`` for a node of the local cluster: start what is down, join, enable the plugin on every node."""
    from .devcluster import ClusterError, LocalCluster

    print("cluster: a node of the local cluster; bringing it up: python -m pool.devcluster up")
    try:
        LocalCluster().up()
        return True
    except ClusterError as exc:
        print(f"cluster: {exc}")
        return False


def _check_node(url: str, fix: bool) -> int:
    shown = redact_url(url)
    if fix and _dev_node(url) and (not _reachable(url) or not _plugin_enabled(url)) and not _fix_dev_cluster():
        return 69
    if not _reachable(url):
        start = _sbin(START_COMMAND)
        if not _local(url):
            print(f"broker: cannot connect to {shown}; check the URL and that RabbitMQ runs there")
            return 69
        if start is None:
            print(f"broker: not reachable at {shown} and rabbitmq-server is not installed; install it with: {INSTALL_HINT}")
            return 69
        if not fix:
            print(f"broker: not reachable at {shown}; start it with: rabbitmq-server -detached")
            return 69
        print(f"broker: not reachable at {shown}; starting it: {' '.join(START_COMMAND)}")
        subprocess.run(start, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_WAIT_S
        while not _reachable(url):
            if time.monotonic() > deadline:
                print(f"broker: still not reachable after {START_WAIT_S:.0f}s; see /var/log/rabbitmq/")
                return 69
            time.sleep(1)
    print(f"broker: reachable at {shown}")
    if _plugin_enabled(url):
        print("plugin: rabbitmq_consistent_hash_exchange enabled")
        return 0
    enable = _sbin(ENABLE_COMMAND)
    if not fix or not _local(url) or enable is None:
        print(f"plugin: {PluginMissing()}")
        return 69
    print(f"plugin: enabling: {' '.join(ENABLE_COMMAND)}")
    subprocess.run(enable, check=False, stdout=subprocess.DEVNULL)
    if _plugin_enabled(url):
        print("plugin: rabbitmq_consistent_hash_exchange enabled")
        return 0
    print(f"plugin: still missing; run: {' '.join(ENABLE_COMMAND)}")
    return 69


if __name__ == "__main__":  # usable before the package's console script exists
    sys.exit(doctor(sys.argv[1] if len(sys.argv) > 1 else "amqp://guest:guest@127.0.0.1:5672/%2F", fix=True))
