"""The broker's queue budget: file handles left before it stops accepting connections.

Why: RabbitMQ 3.10 reserves file handles per queue out of its file-descriptor limit (about 3 per
quorum queue here; DESIGN fact 11). With Debian's default limit of 1,024 (927 for its handle
cache), 366 quorum queues left 0 sockets: every AMQP handshake timed out, for every client,
until queues were deleted with ``rabbitmqctl``. So ``ctlpool topology`` and ``resize`` check the
headroom before they add queues, and ``ctlpool doctor`` reports it.

Data flow: AMQP can't tell; ``read`` asks ``rabbitmqctl status`` on a node it can reach (as
``pool.replicas`` does: ``--admin-node``, the dev cluster, or this host's node) -> ``parse``
(pure) -> ``Headroom``; ``Headroom.refusal(new_queues)`` (pure) is the one line that stops a
declaration, with the numbers and the fix; ``None`` when they fit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .replicas import Unavailable, ask

HANDLES_PER_QUEUE = 3  # measured on 3.10.8: 366 quorum queues took the handle cache from ~0 to 1,077
RESERVE_HANDLES = 100  # left for sockets (each connection takes one) and the broker's own files


@dataclass(frozen=True)
class Headroom:
    node: str
    limit: int
    """File handles the broker may use (``file_descriptors.total_limit``)."""
    used: int
    queues: int

    @property
    def left(self) -> int:
        return self.limit - self.used

    def queues_left(self) -> int:
        """Queues that still fit, keeping ``RESERVE_HANDLES`` for connections."""
        return max(0, (self.left - RESERVE_HANDLES) // HANDLES_PER_QUEUE)

    def refusal(self, new_queues: int) -> str | None:
        """Why ``new_queues`` more queues would not fit (None when they do)."""
        if new_queues <= self.queues_left():
            return None
        return (f"the broker ({self.node}) has room for about {self.queues_left()} more queues, not {new_queues}: "
                f"{self.used} of its {self.limit} file handles are used, {self.queues} queues exist, and each "
                f"queue takes about {HANDLES_PER_QUEUE}; past that it stops accepting connections. Raise its limit "
                "(a systemd drop-in for rabbitmq-server with LimitNOFILE=65536) or use fewer partitions")

    def describe(self) -> str:
        return (f"{self.used} of {self.limit} file handles used, {self.queues} queues: room for about "
                f"{self.queues_left()} more")


def parse(status: dict[str, Any], node: str) -> Headroom:
    """``rabbitmqctl status --formatter json`` -> ``Headroom``."""
    fds = status.get("file_descriptors") or {}
    totals = status.get("totals") or {}
    return Headroom(node=node, limit=int(fds.get("total_limit") or 0), used=int(fds.get("total_used") or 0),
                    queues=int(totals.get("queue_count") or 0))


def read(admin_node: str | None, amqp_url: str) -> Headroom:
    """The headroom of the first node rabbitmqctl reaches; ``Unavailable`` says why it can't."""
    node, status = ask(admin_node, amqp_url, "status")
    if not isinstance(status, dict) or "file_descriptors" not in status:
        raise Unavailable(f"rabbitmqctl -n {node or '(local node)'} status: no file descriptor counts in its answer")
    return parse(status, node or "the local node")
