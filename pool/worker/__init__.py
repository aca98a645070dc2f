"""One worker process: consume owned partitions, reconcile keys one at a time, ack after confirms.

The worker is a few rooms, each in its own module, with deliveries flowing one way:

- ``session``: one connected period with the broker (connections, the lease, reconnect backoff);
- ``ownership``: which partitions this member holds; acquire, drain-then-close release;
- ``guard``: the ring-drift window re-routed on acquiring a partition;
- ``intake``: a delivery from arrival to the work queue (park, re-route, delay hop, decode);
- ``dispatch``: the keyed work queue, running reconciles, timeouts, ``ctx.publish``;
- ``settle``: acks, and republishes acked on their confirm (retries, parked copies);
- ``lifecycle``: the ``Worker`` that builds them and runs session after session;
- ``parts``: the plain data they share.

The pure decisions live outside: ``pool.outcome`` (a reconcile's result -> ack / delay /
park), ``pool.assignment`` (which partitions a member owns), ``pool.acks`` (which ack
frames), ``pool.workqueue`` (which key runs next), ``pool.fence`` (the lease).
"""

from .lifecycle import Worker
from .parts import WorkerStats

__all__ = ["Worker", "WorkerStats"]
