"""The worker's way in, on the fake broker: only the ring routes a key to a partition, a key must be
UTF-8, and copies keep what the publisher sent (properties) while fitting the frame."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from pool import codec
from pool.controller import Controller
from tests.unit.worker_fakes import Rig, turns, until


class Fails(Controller):
    """Records every reconcile; fails every one (so its event is retried)."""

    name = "fails"

    def __init__(self) -> None:
        self.seen: list[Any] = []

    async def reconcile(self, key: str, event: Any, ctx: Any) -> None:
        self.seen.append(key)
        raise RuntimeError("boom")


def run(main: Any) -> None:
    asyncio.run(main())


@pytest.mark.parametrize("how", ["default exchange", "CC through the ring", "BCC-like header"])
def test_a_delivery_the_ring_did_not_route_is_rerouted_never_reconciled(how):
    async def main() -> None:
        ctl = Fails()
        rig = Rig(ctl, auto_confirm=True)
        _part, ch = await rig.partition()
        # Given a delivery of key K in a partition the ring did not pick for it
        if how == "default exchange":
            ch.deliver(1, "K", exchange="", headers={"CC": ["ctl.fails.p000"], "x-app": 1})
        elif how == "CC through the ring":
            ch.deliver(1, "K", headers={"CC": ["other-key"], "x-app": 1})
        else:
            ch.deliver(1, "K", headers={"BCC": ["other-key"], "x-app": 1})
        await until(lambda: rig.wire.acks(), "acked on the re-route's confirm")
        # Then it was not reconciled here, but sent through the controller's exchange without CC/BCC
        assert ctl.seen == []
        (copy,) = rig.wire.published
        assert (copy.exchange, copy.key) == ("ctl.fails", "K")
        assert "CC" not in copy.headers and "BCC" not in copy.headers and copy.headers["x-app"] == 1
        assert copy.headers[codec.H_MISROUTED] == ("exchange ''" if how == "default exchange"
                                                   else "header " + ("BCC" if "BCC" in how else "CC"))
        # and the copy, coming back through the ring, is reconciled
        ch.deliver(2, "K", headers=copy.headers)
        await until(lambda: ctl.seen == ["K"], "reconciled once it came through the ring")
    run(main)


def test_a_routing_key_that_is_not_utf8_is_parked_never_reconciled_as_bytes():
    async def main() -> None:
        ctl = Fails()
        rig = Rig(ctl, auto_confirm=True)
        _part, ch = await rig.partition()
        ch.deliver(1, b"caf\xe9")
        await until(lambda: rig.wire.acks(), "acked once parked")
        assert ctl.seen == []
        (parked,) = rig.wire.published
        assert parked.key == "ctl.fails.parked" and parked.headers[codec.H_REASON] == codec.PARK_BAD_KEY
        assert "not UTF-8" in parked.headers[codec.H_ERROR]
    run(main)


def test_retries_and_parked_copies_keep_the_publishers_properties():
    async def main() -> None:
        ctl = Fails()
        rig = Rig(ctl, auto_confirm=True)
        _part, ch = await rig.partition()
        props = {"message_id": "m-1", "correlation_id": "c-1", "reply_to": "replies", "type": "deploy",
                 "app_id": "web", "timestamp": 1_733_650_000_000, "priority": 3, "expiration": "5000",
                 "user_id": "alice"}
        # Given an event with every property, failing every time
        ch.deliver(1, "k", properties=props)
        await until(lambda: rig.wire.published, "a retry")
        retry = rig.wire.published[0]
        # Then the retry copy keeps them (but expiration and user_id, named)
        for name in ("message_id", "correlation_id", "reply_to", "type", "app_id", "timestamp", "priority"):
            assert getattr(retry.props, name) == props[name], name
        assert retry.props.expiration is None and retry.props.user_id is None
        assert retry.headers[codec.H_DROPPED_PROPS] == "expiration=5000,user_id=alice"
        # and when it comes back as the last attempt, the parked copy keeps them too
        ch.deliver(2, "k", headers={**retry.headers, codec.H_ATTEMPT: 7}, properties={
            n: getattr(retry.props, n) for n in ("message_id", "correlation_id", "timestamp", "app_id")})
        await until(lambda: len(rig.wire.published) == 2, "parked")
        parked = rig.wire.published[1]
        assert parked.headers[codec.H_REASON] == codec.PARK_MAX_ATTEMPTS
        assert (parked.props.message_id, parked.props.timestamp) == ("m-1", 1_733_650_000_000)
    run(main)


def test_a_retry_of_an_event_near_the_frame_limit_fits_and_says_what_it_dropped():
    async def main() -> None:
        ctl = Fails()
        rig = Rig(ctl, auto_confirm=True)
        _part, ch = await rig.partition()
        # Given an event whose headers fill the frame but for 16 bytes (the broker took it)
        ch.deliver(1, "k", headers={"x-blob": "b" * (131_072 - 16 - 60)})
        await until(lambda: rig.wire.published, "a retry")
        await turns()
        # Then its retry fits the connection's frame_max, naming the header it had to drop
        from pool import copies
        retry = rig.wire.published[0]
        assert copies.header_size(retry.props) <= 131_072
        assert "x-blob" not in retry.headers and retry.headers[codec.H_DROPPED] == "x-blob"
        assert rig.wire.acks() == [(1, False)]
    run(main)
