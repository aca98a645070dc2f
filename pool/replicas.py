"""Where each quorum queue is led and how many of its replicas are online, as the broker's own CLI says.

AMQP cannot tell (a passive declare answers two counts), so ``ctlpool status`` and ``ctlpool
doctor`` ask ``rabbitmqctl`` on a node it can reach: ``--admin-node`` when given; else the
local dev cluster's nodes when the URLs are that cluster's (``make cluster``); else
rabbitmqctl's own default, the node on this host. rabbitmqctl needs the cluster's Erlang
cookie: it works on a broker host, or where the cookie was copied (``~/.erlang.cookie``).
Where it can't, ``Unavailable`` says why and what to do, and the callers show everything else.

Data flow: ``read`` runs ``rabbitmqctl list_queues`` once -> ``parse`` (pure) -> {queue:
``Replicas``}; ``nodes`` runs ``cluster_status`` -> ``parse_nodes`` (pure);
``under_replicated`` and ``leaders_per_node`` (pure) are what the callers print.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable
from urllib.parse import urlsplit

from .urls import split_urls, vhost

CTL_TIMEOUT_S = 15.0  # a node that exists gives up in a second or two; an unresolvable host hangs
COLUMNS = ("name", "type", "leader", "members", "online")
COOKIE_HINT = ("rabbitmqctl needs the cluster's Erlang cookie: run this on a broker host (as root or rabbitmq), "
               "or copy the cookie to ~/.erlang.cookie; name a node with --admin-node NAME@HOST")


class Unavailable(Exception):
    """rabbitmqctl is missing or cannot reach a node; the message says what to do."""


@dataclass(frozen=True)
class Replicas:
    """One quorum queue's Raft group."""

    leader: str
    members: tuple[str, ...]
    online: tuple[str, ...]

    @property
    def under(self) -> bool:
        return len(self.online) < len(self.members)

    def text(self) -> str:
        return f"{len(self.online)}/{len(self.members)}"


@dataclass(frozen=True)
class ClusterNodes:
    running: tuple[str, ...]
    stopped: tuple[str, ...]  # members of the cluster that are not running


def parse(rows: Iterable[dict[str, Any]]) -> dict[str, Replicas]:
    """``list_queues name type leader members online --formatter json`` -> quorum queues only
    (a classic queue answers "" in the last three: it has no replicas)."""
    out = {}
    for r in rows:
        members = r.get("members")
        if r.get("type") != "quorum" or not isinstance(members, list):
            continue
        online = r.get("online")
        out[str(r["name"])] = Replicas(str(r.get("leader") or ""), tuple(map(str, members)),
                                       tuple(map(str, online if isinstance(online, list) else [])))
    return out


def parse_nodes(status: dict[str, Any]) -> ClusterNodes:
    """``cluster_status --formatter json`` -> which nodes run and which cluster members don't."""
    running = tuple(sorted(map(str, status.get("running_nodes") or [])))
    members = set(map(str, status.get("disk_nodes") or [])) | set(map(str, status.get("ram_nodes") or []))
    return ClusterNodes(running, tuple(sorted(members - set(running))))


def under_replicated(replicas: dict[str, Replicas], prefix: str) -> list[str]:
    """Our queues (``prefix.``) with fewer replicas online than members, as ``name (online/members)``."""
    return [f"{q} ({r.text()})" for q, r in sorted(replicas.items()) if q.startswith(prefix + ".") and r.under]


def leaders_per_node(replicas: dict[str, Replicas], queues: Iterable[str]) -> dict[str, int]:
    return dict(sorted(Counter(replicas[q].leader for q in queues if q in replicas).items()))


def candidates(admin_node: str | None, amqp_url: str) -> list[str | None]:
    """The nodes to ask, in order (None: rabbitmqctl's default node)."""
    if admin_node:
        return [admin_node]
    from .devcluster.nodes import NODES

    ports = {n.amqp_port: n.name for n in NODES}
    urls = [urlsplit(u) for u in split_urls(amqp_url)]
    if all(u.hostname in ("localhost", "127.0.0.1", "::1") and u.port in ports for u in urls):
        return [ports[u.port] for u in urls if u.port is not None]  # the local dev cluster
    return [None]


def _ctl(node: str | None, *args: str) -> Any:
    exe = shutil.which("rabbitmqctl") or shutil.which("rabbitmqctl", path="/usr/sbin:/usr/lib/rabbitmq/bin")
    if exe is None:
        raise Unavailable("rabbitmqctl is not installed here (it comes with rabbitmq-server); " + COOKIE_HINT)
    cmd = [exe, *(["-n", node] if node else []), "-q", *args, "--formatter", "json"]
    env = dict(os.environ)
    if os.geteuid() == 0 and os.path.isdir("/var/lib/rabbitmq"):
        env["HOME"] = "/var/lib/rabbitmq"  # root uses the rabbitmq user's cookie, as the broker's own tools do
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=CTL_TIMEOUT_S, env=env)
    except subprocess.TimeoutExpired:
        raise Unavailable(f"rabbitmqctl -n {node or '(local node)'}: no answer in {CTL_TIMEOUT_S:.0f}s; {COOKIE_HINT}") from None
    if r.returncode != 0:
        first = (r.stderr.strip() or r.stdout.strip() or f"exit {r.returncode}").splitlines()[0]
        raise Unavailable(f"rabbitmqctl -n {node or '(local node)'}: {first[:200]}; {COOKIE_HINT}")
    try:
        return json.loads(r.stdout or "null")
    except ValueError:
        raise Unavailable(f"rabbitmqctl -n {node or '(local node)'}: answered something other than JSON") from None


def ask(admin_node: str | None, amqp_url: str, *args: str) -> tuple[str | None, Any]:
    """``rabbitmqctl ARGS`` on the first candidate node that answers: (that node, its JSON answer)."""
    errors = []
    for node in candidates(admin_node, amqp_url):
        try:
            return node, _ctl(node, *args)
        except Unavailable as exc:
            errors.append(str(exc))
    raise Unavailable(errors[-1])


def read(admin_node: str | None, amqp_url: str) -> dict[str, Replicas]:
    """Every quorum queue of the URLs' vhost: leader, members, online replicas."""
    _node, rows = ask(admin_node, amqp_url, "list_queues", "-p", vhost(split_urls(amqp_url)[0]), *COLUMNS)
    return parse(rows if isinstance(rows, list) else [])


def nodes(admin_node: str | None, amqp_url: str) -> ClusterNodes:
    _node, status = ask(admin_node, amqp_url, "cluster_status")
    return parse_nodes(status if isinstance(status, dict) else {})
