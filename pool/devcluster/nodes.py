"""The local dev cluster's three nodes: names, ports and URLs (no I/O; ``pool.replicas`` reads it too).

Data flow: constants in, one frozen ``Node`` per node out; ``resolve_node`` turns what a user
types (``2``, ``c2``, ``ctlpool-c2@localhost``) into the node's number.
"""

from __future__ import annotations

from dataclasses import dataclass

HOST = "localhost"  # short names, like the default node rabbit@localhost
NODE_COUNT = 3
AMQP_PORT_BASE = 5680  # node N listens on 5680 + N
DIST_PORT_BASE = 25680  # node N's inter-node port (the default node's is 25672)


@dataclass(frozen=True)
class Node:
    number: int  # 1..3
    short: str  # ctlpool-cN
    name: str  # ctlpool-cN@localhost
    amqp_port: int
    dist_port: int
    url: str  # guest/guest: guest may log in from localhost only, which is where the clients are


def make_node(n: int) -> Node:
    port, short = AMQP_PORT_BASE + n, f"ctlpool-c{n}"
    return Node(n, short, f"{short}@{HOST}", port, DIST_PORT_BASE + n, f"amqp://guest:guest@127.0.0.1:{port}/%2F")


NODES = tuple(make_node(n) for n in range(1, NODE_COUNT + 1))


def resolve_node(text: str | int) -> int:
    """The node number (1..3) of ``2``, ``"2"``, ``"c2"``, ``"ctlpool-c2"`` or ``"ctlpool-c2@localhost"``."""
    t = str(text).strip()
    for node in NODES:
        if t in (str(node.number), f"c{node.number}", node.short, node.name):
            return node.number
    raise ValueError(f"no such node {t!r}: give 1..{NODE_COUNT} or a name like {NODES[0].name}")
