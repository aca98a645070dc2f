"""Ownership and the ring-drift guard without a broker: acquiring, releasing and the guard
window, on fake channels that record every publish, confirm, ack and close in order."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from pool import codec
from tests.unit.test_dispatch import Gated, run
from tests.unit.worker_fakes import Rig, turns, until


def test_release_waits_for_work_in_flight_before_closing_the_channel():
    async def main() -> None:
        ctl = Gated()
        rig = Rig(ctl, auto_confirm=True)
        part, ch = await rig.partition()
        # Given one reconcile running (tag 1) and a delivery waiting behind it (tag 2, same key)
        ch.deliver(1, "a")
        await until(lambda: ctl.started == ["a"], "reconcile started")
        ch.deliver(2, "a")
        # When the partition is released
        release = asyncio.ensure_future(rig.ownership.release(part))
        await turns()
        # Then its channel stays open while the reconcile runs, and nothing is cancelled
        assert ("close", part.queue) not in rig.wire.log and ch.is_open and ctl.cancelled == []
        ctl.gate("a").set()
        await until(release.done, "release finished")
        release.result()
        # the waiting delivery was not reconciled here: re-routed through the exchange instead
        assert ctl.started == ["a"]
        (reroute,) = rig.wire.published
        assert (reroute.exchange, reroute.key) == ("ctl.gated", "a")
        # and both were acked (the re-route on its confirm) before the channel closed
        closed_at = rig.wire.index("close", part.queue)
        assert rig.wire.index("confirm", 1) < closed_at
        assert sorted(rig.wire.acked_tags(before=closed_at)) == [1, 2]
        assert (0, 0) not in rig.ownership.parts
    run(main)


def test_deliveries_arriving_during_a_release_are_rerouted_not_reconciled():
    async def main() -> None:
        ctl = Gated()
        rig = Rig(ctl, auto_confirm=True)
        part, ch = await rig.partition()
        ch.deliver(1, "a")
        await until(lambda: ctl.started == ["a"], "reconcile started")
        release = asyncio.ensure_future(rig.ownership.release(part))
        await turns()
        # prefetched messages still arriving on the channel while it drains
        ch.deliver(2, "b")
        ch.deliver(3, "c", headers={codec.H_REDELIVERIES: 1}, redelivered=True)
        await turns()
        assert ctl.started == ["a"]
        ctl.gate("a").set()
        await until(release.done, "release finished")
        assert [(p.exchange, p.key) for p in rig.wire.published] == [("ctl.gated", "b"), ("ctl.gated", "c")]
        assert rig.wire.published[1].headers[codec.H_REDELIVERIES] == 1  # the death count travels
        closed_at = rig.wire.index("close", part.queue)
        assert sorted(rig.wire.acked_tags(before=closed_at)) == [1, 2, 3]
    run(main)


def test_a_release_during_the_acquisition_leaves_no_consumer_behind():
    async def main() -> None:
        ctl = Gated()
        # Given an acquisition waiting for the broker (basic.qos not answered yet)
        rig = Rig(ctl, clean=False, auto_confirm=True)
        qos: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        rig.conn.answers["basic_qos"] = qos
        rig.conn.answers["queue_declare"] = SimpleNamespace(method=SimpleNamespace(message_count=0, consumer_count=1))
        acquiring = asyncio.ensure_future(rig.ownership.acquire(rig.ctl, 0))
        await until(lambda: ("rpc", "basic_qos", None) in rig.wire.log, "acquisition under way")
        part = rig.ownership.parts[(0, 0)]
        # When the assignment moves the partition away before the channel is ready (a peer joined)
        release = asyncio.ensure_future(rig.ownership.release(part))
        await turns()
        qos.set_result(None)
        await until(lambda: release.done() and acquiring.done(), "release and acquisition finished")
        release.result()
        # Then no channel is left consuming the partition: a consumer nobody owns would hold a
        # prefetch of deliveries forever (a stalled partition: 50 unacked, as one looked in CI)
        consumed = [c for c in rig.conn.channels if c.on_message is not None]
        assert all(not c.is_open for c in consumed)
        assert all(not c.is_open for c in rig.conn.channels if c.queue == part.queue or c is part.ch)
        assert (0, 0) not in rig.ownership.parts and part.ch is not None and not part.ch.is_open
    run(main)


def test_the_guard_reroutes_exactly_the_backlog_present_at_acquisition():
    async def main() -> None:
        ctl = Gated()
        # Given a partition not known clean in this broker epoch
        rig = Rig(ctl, clean=False, auto_confirm=True)
        count: asyncio.Future[SimpleNamespace] = asyncio.get_running_loop().create_future()
        rig.conn.answers["queue_declare"] = count
        acquiring = asyncio.ensure_future(rig.ownership.acquire(rig.ctl, 0))
        await until(lambda: rig.conn.channels and rig.conn.channels[-1].on_message, "subscribed")
        ch = rig.conn.channels[-1]
        # 3 deliveries arrive while the window is being measured (held), and 2 more are still ready
        for tag in (1, 2, 3):
            ch.deliver(tag, f"old{tag}")
        await turns()
        assert rig.wire.published == [] and ctl.started == []
        count.set_result(SimpleNamespace(method=SimpleNamespace(message_count=2, consumer_count=1)))
        await until(acquiring.done, "acquired")
        # the 2 ready ones arrive next, then fresh events
        ch.deliver(4, "old4")
        ch.deliver(5, "old5")
        ch.deliver(6, "new6")
        ch.deliver(7, "new7")
        # Then exactly the 5 of the window are re-routed, and the fresh ones reconciled
        await until(lambda: len(ctl.started) == 2, "fresh events reconciled")
        assert [p.key for p in rig.wire.published if p.exchange == "ctl.gated"] == [f"old{t}" for t in range(1, 6)]
        assert ctl.started == ["new6", "new7"]
        # a redelivery after the window (a consumer that died holding it) is re-routed too
        ch.deliver(8, "old8", redelivered=True)
        await turns()
        assert rig.wire.published[-1].key == "old8" and ctl.started == ["new6", "new7"]
        # and, the whole window confirmed, the partition is marked clean for later owners
        marker = rig.ctl.names.clean_marker(0, 4)
        await until(lambda: ("rpc", "exchange_declare", marker) in rig.wire.log, "marked clean")
        assert rig.wire.index("rpc", "exchange_declare", marker) > max(rig.wire.index("confirm", s) for s in range(1, 6))
        assert rig.worker.stats.rerouted == 6
    run(main)


def test_a_clean_partition_is_not_guarded():
    async def main() -> None:
        ctl = Gated()
        rig = Rig(ctl, clean=True, auto_confirm=True)
        part, ch = await rig.partition()
        ch.deliver(1, "a", redelivered=True)
        await until(lambda: ctl.started == ["a"], "reconciled")
        assert rig.wire.published == []
    run(main)


def test_a_channel_the_broker_closes_ends_the_session_a_release_does_not():
    async def main() -> None:
        rig = Rig(Gated(), auto_confirm=True)
        part, ch = await rig.partition(0)
        other, och = await rig.partition(1)
        rig.ownership.joined = True
        # A release closing its own channel is not a loss
        await rig.ownership.release(other)
        och.closed.set_result("closed by us")
        await turns()
        assert not rig.session.lost.done()
        # The broker cancelling a held partition's consumer is
        ch.cancelled.set_result(None)
        await turns()
        assert rig.session.lost.done() and "consumer cancelled" in rig.session.lost.result()
    run(main)
