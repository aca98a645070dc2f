"""The broker session: one connected period of a worker, and how long to wait before the next.

Data flow: ``Session.open`` connects the consume connection (partition channels, the member
listen queue) and the publish connection (the confirm channel everything is republished on,
and the member heartbeats: the broker blocks a connection that publishes during an alarm,
and a blocked consume connection could not even be closed). Before any partition is taken,
the lease starts (``pool.fence``): renewed by every socket read of the consume connection,
where our own heartbeats echo back every interval and ``probe`` asks for an answer every
tick. ``lost`` resolves with the reason when any part of the session fails (a connection or
the confirm channel closes, a partition loses its consumer, the lease runs out, a publish goes
unconfirmed for ``CONFIRM_STALL_S``); ``Worker`` then cancels everything and opens a new
session after ``Backoff``'s delay.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable

from ..amqp import Channel, ChannelGone, ConfirmChannel, Connection, connect
from ..fence import LEASE_FRACTION, Lease
from ..settings import BrokerSettings
from ..topology import members_exchange

CONFIRM_STALL_S = 120.0  # a publish unconfirmed this long (the broker not blocking us) ends the session
RECONNECT_FIRST_S = 0.5  # first reconnect delay; doubles up to broker.reconnect_max_s
JITTER = 0.2  # ±20% on reconnect delays, so a fleet doesn't reconnect in lockstep


class Backoff:
    """Reconnect delays: ``RECONNECT_FIRST_S`` doubling up to ``max_s``, jittered; a session that
    served (got as far as consuming) starts the next outage afresh, and on a cluster
    (``nodes`` > 1) reconnects at once: ``connect`` moves on to the next node by itself and
    fails only when every node did. Pure: no clock, no I/O."""

    def __init__(self, max_s: float, rand: Callable[[], float], nodes: int = 1) -> None:
        self._max_s = max_s
        self._rand = rand
        self._nodes = nodes
        self._next = RECONNECT_FIRST_S

    def after(self, served: bool) -> float:
        """The delay before the next session, given whether the one that ended served."""
        if served:
            self._next = RECONNECT_FIRST_S
            if self._nodes > 1:
                return 0.0
        delay = self._next * (1 + JITTER * (2 * self._rand() - 1))
        self._next = min(self._next * 2, self._max_s)
        return delay


class Session:
    """Open connections of one connected period (see the module docstring)."""

    def __init__(self, consume: Connection, publish: Connection, pub: ConfirmChannel, heartbeats: Channel,
                 listen: Channel, lease: Lease, lost: asyncio.Future[ChannelGone]) -> None:
        self.consume = consume
        self.publish = publish
        self.pub = pub
        self.heartbeats = heartbeats
        self.listen = listen
        self.lease = lease
        self.lost = lost
        self._probing: asyncio.Future[Any] | None = None
        self._oldest: int | None = None  # the oldest unconfirmed publish seen by check_confirms...
        self._oldest_since = 0.0  # ...and since when

    @classmethod
    async def open(cls, broker: BrokerSettings, member_id: str, *, on_heartbeat: Callable[..., None],
                   on_lease_lost: Callable[[str], None], clock: Callable[[], float],
                   opened: list[Connection]) -> "Session":
        """Connect, listen for member heartbeats, start the lease. Every connection made is
        appended to ``opened`` at once, so the caller closes them even if a later step fails."""
        consume = await connect(broker.amqp_url, name=f"ctlpool {member_id} consume", heartbeat_s=broker.heartbeat_s)
        opened.append(consume)
        publish = await connect(broker.amqp_url, name=f"ctlpool {member_id} publish", heartbeat_s=broker.heartbeat_s)
        opened.append(publish)
        pub = await publish.confirm_channel()
        heartbeats = await publish.channel()
        listen = await consume.channel()
        ok = await listen.rpc("queue_declare", queue="", exclusive=True, auto_delete=True)
        await listen.rpc("queue_bind", queue=ok.method.queue, exchange=members_exchange(broker.prefix))
        await listen.consume(ok.method.queue, on_heartbeat, auto_ack=True)
        # From here on, a lost lease means the broker may have given our partitions away.
        lease = Lease(clock, LEASE_FRACTION * consume.heartbeat_s if consume.heartbeat_s else float("inf"),
                      on_lost=on_lease_lost)
        consume.on_data(lease.heard)
        return cls(consume, publish, pub, heartbeats, listen, lease, asyncio.get_running_loop().create_future())

    def lose(self, why: str) -> None:
        """End the session the way a connection loss does (first reason wins)."""
        if not self.lost.done():
            self.lost.set_result(ChannelGone(0, why))

    def probe(self) -> None:
        """Every tick: ask the consume connection's node for an answer (a no-op ``basic.qos`` on
        the listen channel), so the lease is renewed while the node answers, even when nothing
        else comes (an alarm stops every member's heartbeats), and check it: a node gone silent
        (paused, cut off, powered off, with no TCP reset to tell us) fences this session within
        a tick of the lease running out, not when the AMQP heartbeat gives up (twice the timeout)."""
        if self.lease.valid() and (self._probing is None or self._probing.done()):
            self._probing = asyncio.ensure_future(self.listen.rpc("basic_qos", prefetch_count=0))
            self._probing.add_done_callback(lambda f: f.cancelled() or f.exception())  # a failure is the session's

    def check_confirms(self, now: float) -> None:
        """Every tick: a publish the broker has not confirmed for ``CONFIRM_STALL_S`` (while not
        blocking the connection for an alarm) ends the session: the deliveries waiting on it go
        back to the broker and come again, rather than sit unacked in a stalled partition."""
        oldest = self.pub.oldest_unconfirmed
        if oldest != self._oldest or self.publish.blocked:
            self._oldest, self._oldest_since = oldest, now
        elif oldest is not None and now - self._oldest_since > CONFIRM_STALL_S:
            self.lose(f"a publish got no confirm from the broker in {CONFIRM_STALL_S:.0f}s")

    async def until_lost(self, stop: asyncio.Event) -> None:
        """Return when ``stop`` is set; raise ``ChannelGone`` when the session fails first."""
        stopping = asyncio.ensure_future(stop.wait())
        watched: list[asyncio.Future[Any]] = [self.consume.closed, self.publish.closed, self.pub.ch.closed, self.lost]
        try:
            await asyncio.wait([stopping, *watched], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
        if stop.is_set():
            return
        if self.lost.done():
            raise self.lost.result()
        reason = next(f.result() for f in watched if f.done())
        raise ChannelGone(reason.reply_code, f"connection lost: {reason.reply_text}")
