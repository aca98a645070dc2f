"""Dispatch and settling without a broker: a fake confirm channel records publishes, the test
gives confirms, and the log shows the order in which the worker sent confirms-dependent acks."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from pool import codec
from pool.controller import Controller, Result
from tests.unit.worker_fakes import Rig, turns, until


def run(main: Any) -> Any:
    return asyncio.run(main())


class Emits(Controller):
    """Publishes one event per reconcile to another of its own keys, then converges."""

    name = "emits"

    async def reconcile(self, key: str, event: Any, ctx: Any) -> None:
        await asyncio.sleep(0)  # a real step, so the rest runs in the lease-checking driver
        ctx.publish("emits", f"{key}-child", {"from": key})


class Gated(Controller):
    """Each reconcile waits until the test opens its key's gate (or forever)."""

    name = "gated"

    def __init__(self) -> None:
        self.gates: dict[str, asyncio.Event] = {}
        self.started: list[str] = []
        self.cancelled: list[str] = []
        self.fail = False

    def gate(self, key: str) -> asyncio.Event:
        return self.gates.setdefault(key, asyncio.Event())

    async def reconcile(self, key: str, event: Any, ctx: Any) -> Result | None:
        self.started.append(key)
        try:
            await self.gate(key).wait()
        except asyncio.CancelledError:
            self.cancelled.append(key)
            raise
        return None


async def one_running(ctl: Gated, key: str, **flags: Any) -> Rig:
    """A rig whose partition delivered ``key`` (tag 1), its reconcile started."""
    rig = Rig(ctl, **flags)
    _part, ch = await rig.partition()
    ch.deliver(1, key)
    await until(lambda: ctl.started, "started")
    return rig


def test_no_ack_before_the_confirms_of_what_the_reconcile_published():
    async def main() -> None:
        rig = Rig(Emits())
        part, ch = await rig.partition()
        ch.deliver(1, "a")
        await until(lambda: rig.wire.published, "the reconcile published")
        await turns()
        # Given the reconcile published and returned, while the broker has not confirmed
        assert rig.wire.acks() == []
        # When the broker confirms
        rig.wire.confirm()
        # Then the delivery is acked, after the confirm
        await until(lambda: rig.wire.acks(), "ack")
        assert rig.wire.acks() == [(1, False)]
        assert rig.wire.index("confirm", 1) < rig.wire.index("ack", 1, False)
        assert rig.wire.published[0].exchange == "ctl.emits" and rig.wire.published[0].key == "a-child"
    run(main)


def test_a_refused_confirm_never_acks_and_returns_the_delivery_later():
    async def main() -> None:
        rig = Rig(Emits())
        part, ch = await rig.partition()
        ch.deliver(1, "a")
        await until(lambda: rig.wire.published, "the reconcile published")
        # When the broker nacks what the reconcile published
        rig.wire.pending.pop(1).set_exception(RuntimeError("nacked"))
        await until(lambda: len(rig.wire.published) == 2, "the retry")
        # Then the reconcile failed: its event rides a delay tier with attempt 1, and only that
        # publish's confirm acks the delivery
        retry = rig.wire.published[1]
        assert retry.exchange.startswith("ctl.emits.delay") and retry.headers[codec.H_ATTEMPT] == 1
        await turns()
        assert rig.wire.acks() == []
        rig.wire.confirm(2)
        await until(lambda: rig.wire.acks(), "ack")
        assert rig.wire.acks() == [(1, False)]
    run(main)


@pytest.mark.parametrize("seed", range(20))
def test_a_multiple_ack_never_covers_unfinished_work(seed):
    async def main() -> None:
        # Given 12 deliveries on one channel (distinct keys), finishing in a random order
        rnd = random.Random(seed)
        ctl = Gated()
        rig = Rig(ctl, concurrency=64)
        part, ch = await rig.partition()
        keys = [f"k{t}" for t in range(1, 13)]
        for tag, key in enumerate(keys, 1):
            ch.deliver(tag, key)
        await until(lambda: len(ctl.started) == 12, "all reconciles started")
        finished: set[int] = set()
        order = list(range(1, 13))
        rnd.shuffle(order)
        for tag in order:
            ctl.gate(keys[tag - 1]).set()
            finished.add(tag)
            await turns(rnd.randint(0, 6))
            # Then every ack frame sent so far names only finished deliveries, a multiple one included
            for acked, multiple in rig.wire.acks():
                covered = set(range(1, acked + 1)) if multiple else {acked}
                assert covered <= finished, (acked, multiple, sorted(finished))
        # and every delivery is acked, exactly once
        await until(lambda: sorted(rig.wire.acked_tags()) == list(range(1, 13)), "each acked once")
    run(main)


def test_a_reconcile_past_its_timeout_is_cancelled_by_the_clock_and_retried():
    async def main() -> None:
        ctl = Gated()
        rig = await one_running(ctl, "slow", **{"reconcile-timeout-s": 30})
        # Given 29 s on the clock: not expired
        rig.clock.now += 29.0
        rig.dispatch.expire()
        await turns()
        assert ctl.cancelled == [] and rig.wire.published == []
        # When the clock passes the 30 s timeout
        rig.clock.now += 2.0
        rig.dispatch.expire()
        # Then the reconcile is cancelled and settles as a failure: a retry with attempt 1
        await until(lambda: rig.wire.published, "the retry")
        assert ctl.cancelled == ["slow"]
        retry = rig.wire.published[0]
        assert retry.headers[codec.H_ATTEMPT] == 1 and retry.exchange.startswith("ctl.gated.delay")
        rig.wire.confirm()
        await until(lambda: rig.wire.acks() == [(1, False)], "ack after the retry's confirm")
    run(main)


def test_a_deadline_passing_while_the_retry_awaits_its_confirm_gives_the_event_back(monkeypatch):
    from pool.worker import settle

    monkeypatch.setattr(settle, "SETTLE_RETRY_S", 0.0)

    async def main() -> None:
        ctl = Gated()
        rig = await one_running(ctl, "a", **{"reconcile-timeout-s": 30})
        # Given a reconcile that failed (timed out) and whose retry the broker has not confirmed
        rig.clock.now += 31.0
        rig.dispatch.expire()
        await until(lambda: rig.wire.published, "the retry")
        # When its task is cancelled once more by the deadline (an expire that lands in the settle)
        task, run = next(iter(rig.dispatch._runs.items()))
        run.timed_out = True
        task.cancel()
        # Then the delivery is not left unacked forever: it goes back to its queue...
        await until(lambda: ("nack", 1) in rig.wire.log, "nacked back")
        assert rig.wire.acks() == [] and rig.dispatch.in_flight == 0
        # ...and a late confirm of the retry acks nothing (a second settle of tag 1 would close the channel)
        rig.wire.confirm()
        await turns()
        assert rig.wire.acks() == []
    run(main)


def test_events_for_a_running_key_collapse_into_one_follow_up():
    async def main() -> None:
        ctl = Gated()
        rig = Rig(ctl)
        part, ch = await rig.partition()
        ch.deliver(1, "a")
        await until(lambda: ctl.started == ["a"], "first reconcile")
        ch.deliver(2, "a")
        ch.deliver(3, "a")
        await turns()
        assert ctl.started == ["a"]  # never two at once for one key
        ctl.gate("a").set()
        await until(lambda: ctl.started == ["a", "a"], "one follow-up")
        await until(lambda: sorted(rig.wire.acked_tags()) == [1, 2, 3], "all three acked")
        assert rig.wire.acks() == [(1, False), (3, True)]  # the follow-up's two in one frame
    run(main)
