"""pool.fence with a fake clock: the lease, and the step driver that checks it."""

import asyncio

import pytest

from pool.fence import Fenced, Lease, Steps, fenced


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_hearing_renews_the_lease_until_a_gap_longer_than_it():
    # Given a 2 s lease
    clock, lost = Clock(), []
    lease = Lease(clock, 2.0, on_lost=lost.append)
    # When the broker is heard every 1.5 s, the lease holds
    for _ in range(5):
        clock.now += 1.5
        lease.heard()
        assert lease.valid()
    # Then a read arriving after a 3 s silence does not renew it: it is lost for good
    clock.now += 3.0
    lease.heard()
    clock.now += 0.1
    lease.heard()
    assert not lease.valid() and len(lost) == 1 and "3.0s" in lost[0]


def test_a_step_after_the_lease_ran_out_gets_fenced_instead():
    # Given a reconcile that waits twice, and a lease that runs out during the first wait
    clock = Clock()
    lease = Lease(clock, 2.0)
    steps = []

    async def reconcile() -> str:
        steps.append("first")
        await asyncio.sleep(0)
        clock.now += 10  # frozen: the loop resumes us long after the lease ended
        await asyncio.sleep(0)
        steps.append("after the freeze")  # must never run
        return "done"

    async def main() -> None:
        with pytest.raises(Fenced):
            await fenced(reconcile(), lease, Steps())

    asyncio.run(main())
    # Then the step after the freeze never ran
    assert steps == ["first"]


def test_steps_run_unchanged_and_slow_ones_are_reported():
    clock = Clock()
    lease = Lease(clock, 1e9)
    slow = []

    async def reconcile() -> int:
        await asyncio.sleep(0)
        clock.now += 2.5  # a blocking call inside a step
        return 7

    assert asyncio.run(_await(fenced(reconcile(), lease, Steps(slow.append)))) == 7
    assert slow == [2.5]


async def _await(aw):
    return await aw
