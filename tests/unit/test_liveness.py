"""The liveness invariant without a broker: whenever a session ends, however its reconciles are
cancelled, the worker holds no slot, no key in *processing*, no partition with work dispatched and
no journal record; and the stall watchdog names work that no reconcile will ever start."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from pool import journal
from pool.controller import Controller, Result
from pool.worker import dispatch as dispatch_mod
from tests.unit.worker_fakes import Rig, turns, until


class Steps(Controller):
    """Reconciles that take several steps, publish, fail once or ask to be requeued, by key."""

    name = "steps"

    async def reconcile(self, key: str, event: Any, ctx: Any) -> Result | None:
        for _ in range(3):
            await asyncio.sleep(0)
        if key.startswith("pub"):
            await ctx.publish("steps", f"{key}-child", {"n": 1})
        if key.startswith("fail") and ctx.attempt == 0:
            raise RuntimeError("once")
        if key.startswith("again"):
            return Result(requeue_after=5)
        return None


KEYS = ["pub1", "fail1", "again1", "pub1", "plain1", "fail1", "plain2", "pub2"]


def scenario_turns() -> int:
    """Loop turns the whole scenario takes when nothing cancels it."""
    async def main() -> int:
        rig, _ = await _start()
        n = 0
        while rig.dispatch.in_flight or len(rig.dispatch._wq):
            await asyncio.sleep(0)
            n += 1
            assert n < 1000
        return n
    return asyncio.run(main())


async def _start(tmp: Any = None) -> tuple[Rig, list[Any]]:
    rig = Rig(Steps(), auto_confirm=True, concurrency=2)
    if tmp is not None:
        rig.dispatch.journal = journal.Journal(journal.Store.open(str(tmp / "w.inflight"), 2))
    chans = [(await rig.partition(i))[1] for i in (0, 1)]
    for tag, key in enumerate(KEYS, 1):
        chans[tag % 2].deliver(tag, key)  # both partitions, several keys twice (coalescing)
    return rig, chans


@pytest.mark.parametrize("turn", range(0, scenario_turns() + 2))
def test_a_session_ending_at_any_turn_leaves_nothing_held(turn, tmp_path):
    async def main() -> None:
        # Given reconciles in every state: first step, later steps, awaiting confirms, settling,
        # and keys waiting that a finishing reconcile hands to a task queued (not yet started)
        rig, _ = await _start(tmp_path)
        await turns(turn)
        # When the session ends at this turn (as Worker._teardown does)
        cancelled = rig.dispatch.cancel_all()
        await asyncio.gather(*cancelled, return_exceptions=True)
        await turns(3)
        # Then nothing is held: no slot, no key processing, no partition waiting on work in flight
        parts = list(rig.ownership.parts.values())
        audit = rig.dispatch.audit(parts)
        assert (audit.runs, audit.slots, audit.processing, audit.orphans, audit.dispatched) == (0, 0, 0, (), 0), audit
        assert all(p.idle.is_set() for p in parts)
        assert rig.dispatch._wq.statistics().items == 0
        # and no journal record is left (a death now would blame nothing)
        assert rig.dispatch.journal.store.records() == {}
    asyncio.run(main())


def test_a_task_cancelled_before_its_first_step_is_finished_like_any_other():
    async def main() -> None:
        # Given one slot: "a" runs, "b" waits for it
        rig = Rig(Steps(), auto_confirm=True, concurrency=1)
        _part, ch = await rig.partition()
        ch.deliver(1, "plain-a")
        ch.deliver(2, "plain-b")
        # When "a" finishes, it starts "b" from inside its own task: a task queued, not yet run...
        started = []
        real_pump = rig.dispatch.pump

        def pump() -> None:
            before = set(rig.dispatch._runs)
            real_pump()
            started.extend(set(rig.dispatch._runs) - before)
            if asyncio.current_task() is not None and started and not rig.dispatch._wq.statistics().ready:
                rig.dispatch.cancel_all()  # ...and the session ends right then, before b's first step
        rig.dispatch.pump = pump  # type: ignore[method-assign]
        await until(lambda: not rig.dispatch.running, "the session ended")
        await turns(5)
        # Then b's run was finished all the same: its slot, its key and its delivery are free
        audit = rig.dispatch.audit(list(rig.ownership.parts.values()))
        assert (audit.runs, audit.slots, audit.processing, audit.dispatched) == (0, 0, 0, 0), audit
        assert not audit.leaked
    asyncio.run(main())


class Gated(Controller):
    name = "gated"

    def __init__(self) -> None:
        self.gate = asyncio.Event()

    async def reconcile(self, key: str, event: Any, ctx: Any) -> None:
        await self.gate.wait()


def test_a_long_reconcile_with_events_waiting_behind_it_is_no_stall():
    async def main() -> None:
        # Given one long reconcile of "a" with two more events of "a" waiting behind it, free slots
        rig = Rig(Gated(), concurrency=4)
        part, ch = await rig.partition()
        for tag in (1, 2, 3):
            ch.deliver(tag, "a")
        await turns()
        # When the watchdog looks many ticks in a row
        stalls = [rig.dispatch.stalled([part]) for _ in range(10)]
        # Then it is not a stall: the waiting events belong to a key a reconcile is working on
        assert stalls == [None] * 10
    asyncio.run(main())


def test_work_no_reconcile_will_start_is_reported_after_three_ticks():
    async def main() -> None:
        rig = Rig(Gated(), concurrency=4)
        part, ch = await rig.partition()
        # Given a key left *processing* with no reconcile (the bookkeeping a lost finish leaves)
        # and a slot taken by nobody
        ch.deliver(1, "a")
        await turns()
        task, run = next(iter(rig.dispatch._runs.items()))
        run.finished = True  # as if its finish never ran and never will
        rig.dispatch._runs.clear()
        task.cancel()
        ch.deliver(2, "a")  # an event for that key: it can never be handed out
        # When the watchdog looks
        seen = [rig.dispatch.stalled([part]) for _ in range(dispatch_mod.STALL_TICKS)]
        # Then the third tick in a row reports it, naming the orphaned key
        assert seen[:-1] == [None] * (dispatch_mod.STALL_TICKS - 1)
        assert seen[-1] is not None and seen[-1].orphans == ("a",) and seen[-1].leaked
    asyncio.run(main())


def test_a_stalled_worker_logs_once_and_ends_its_session(caplog):
    async def main() -> None:
        rig = Rig(Gated(), concurrency=4)
        part, ch = await rig.partition()
        ch.deliver(1, "a")
        await turns()
        # Given a slot leaked (taken, no reconcile running) and a key waiting for it
        rig.dispatch._inflight = 4
        ch.deliver(2, "b")
        rig.worker._session = rig.session  # type: ignore[assignment]
        # When the worker's tick runs the watchdog three times
        for _ in range(dispatch_mod.STALL_TICKS):
            rig.worker._watch_liveness(rig.dispatch, rig.ownership)
        # Then one ERROR names what it holds, and the session is ended (a fresh one follows)
        errors = [r for r in caplog.records if r.levelname == "ERROR" and "stalled" in r.getMessage()]
        assert len(errors) == 1 and "2 unacked deliveries" in errors[0].getMessage()
        assert rig.session.lost.done() and "stalled" in rig.session.lost.result()
    asyncio.run(main())
