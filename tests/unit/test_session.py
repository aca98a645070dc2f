"""The broker session's own checks, without a broker: a publish the broker never confirms ends
the session by the (injected) clock, unless the broker is blocking the connection for an alarm."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from pool.worker.session import CONFIRM_STALL_S, Session


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    lp = asyncio.new_event_loop()
    yield lp
    lp.close()


def session(loop: asyncio.AbstractEventLoop, pub: Any, publish: Any) -> Session:
    return Session(consume=None, publish=publish, pub=pub, heartbeats=None, lease=None,  # type: ignore[arg-type]
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
