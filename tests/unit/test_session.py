"""The broker session's own checks, without a broker: a publish the broker never confirms ends
the session by the (injected) clock, unless the broker is blocking the connection for an alarm;
a node that stops answering the tick's probe fences the session once the lease runs out."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from pool.fence import Lease
from pool.worker.session import CONFIRM_STALL_S, Session


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    lp = asyncio.new_event_loop()
    yield lp
    lp.close()


def session(loop: asyncio.AbstractEventLoop, pub: Any, publish: Any, listen: Any = None,
            lease: Lease | None = None) -> Session:
    return Session(consume=None, publish=publish, pub=pub, heartbeats=None, listen=listen, lease=lease,  # type: ignore[arg-type]
                   lost=loop.create_future())


def test_a_publish_never_confirmed_ends_the_session(loop: asyncio.AbstractEventLoop) -> None:
    pub, conn = SimpleNamespace(oldest_unconfirmed=None), SimpleNamespace(blocked=None)
    s = session(loop, pub, conn)
    # Given publishes that get confirmed, one after another (the oldest keeps changing)
    for seq, now in enumerate((0.0, 50.0, 100.0, 150.0), 1):
        pub.oldest_unconfirmed = seq
        s.check_confirms(now)
    assert not s.lost.done()
    # When the oldest one stays unconfirmed past CONFIRM_STALL_S
    s.check_confirms(150.0 + CONFIRM_STALL_S - 1)
    assert not s.lost.done()
    s.check_confirms(150.0 + CONFIRM_STALL_S + 1)
    # Then the session is lost, saying why (its deliveries go back to the broker)
    assert s.lost.done() and "no confirm" in str(s.lost.result())


def test_no_confirms_while_the_broker_blocks_us_is_waiting_not_a_stall(loop: asyncio.AbstractEventLoop) -> None:
    pub, conn = SimpleNamespace(oldest_unconfirmed=7), SimpleNamespace(blocked="low on memory")
    s = session(loop, pub, conn)
    for now in (0.0, CONFIRM_STALL_S, 3 * CONFIRM_STALL_S):
        s.check_confirms(now)
    assert not s.lost.done()
    # and nothing waiting is never a stall
    pub.oldest_unconfirmed, conn.blocked = None, None
    for now in (4 * CONFIRM_STALL_S, 9 * CONFIRM_STALL_S):
        s.check_confirms(now)
    assert not s.lost.done()


class Listen:
    """The listen channel: records each RPC; the test answers them."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.asked: list[tuple[str, dict[str, Any]]] = []
        self.answers: list[asyncio.Future[Any]] = []

    async def rpc(self, method: str, /, **kwargs: Any) -> Any:
        self.asked.append((method, kwargs))
        self.answers.append(self.loop.create_future())
        return await self.answers[-1]


def test_a_node_that_stops_answering_the_probe_fences_the_session_when_the_lease_runs_out(
        loop: asyncio.AbstractEventLoop) -> None:
    now = [0.0]
    fenced: list[str] = []
    lease = Lease(lambda: now[0], 10.0, on_lost=fenced.append)
    listen = Listen(loop)
    s = session(loop, None, None, listen, lease)

    async def tick(at: float) -> None:
        now[0] = at
        s.probe()
        await asyncio.sleep(0)

    async def main() -> None:
        # Given a node that answers each tick's probe (each answer is a read: it renews the lease)
        for at in (1.0, 2.0, 3.0):
            await tick(at)
            lease.heard()
            listen.answers[-1].set_result("qos-ok")
            await asyncio.sleep(0)  # the probe takes its answer
        assert [m for m, _ in listen.asked] == ["basic_qos"] * 3 and not fenced
        # When it stops answering (paused, cut off: no reset comes), the ticks ask nothing more meanwhile
        for at in (4.0, 8.0, 13.0):
            await tick(at)
        assert len(listen.asked) == 4 and not fenced
        # Then the first tick after the lease ran out fences the session, saying why, and asks no more
        await tick(13.5)
        assert fenced and "nothing heard from the broker for 10.5s" in fenced[0]
        assert len(listen.asked) == 4
        listen.answers[-1].cancel()

    loop.run_until_complete(main())
