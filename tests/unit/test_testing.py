"""pool.testing: controllers tested with no broker, on the worker's own rooms and a virtual clock.

The example in the README's "Testing your controllers" is the first test here, as written there.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from pool import Controller, Permanent, Result, RetryPolicy
from pool.testing import Harness, HarnessTimeout


class Flaky(Exception):
    pass


class Certificates(Controller):
    """Issues a certificate per domain: waits for DNS (requeue_after), survives a flaky CA, parks bad names."""

    name = "certificates"
    retry = RetryPolicy(base_s=2, factor=2, max_delay_s=60, max_attempts=5)

    def __init__(self) -> None:
        self.dns_ready: set[str] = set()
        self.ca_failures = 2  # the CA fails twice, then works
        self.issued: list[str] = []

    async def reconcile(self, key: str, event: Any, ctx: Any) -> Result | None:
        if not key.endswith(".example"):
            raise Permanent(f"{key}: not a domain we serve")
        if key not in self.dns_ready:
            self.dns_ready.add(key)  # (a real one would look it up; here it is ready next time)
            return Result(requeue_after=30)
        if self.ca_failures:
            self.ca_failures -= 1
            raise Flaky("CA timed out")
        self.issued.append(key)
        await ctx.publish("audit", key, {"issued": key})
        return None


def test_the_readme_example(ctlpool):
    h = ctlpool(Certificates())
    h.publish("certificates", "www.example", {"reason": "created"})
    h.publish("certificates", "evil.test", {})
    h.run_until_idle()

    www = h.reconciles_of("www.example")
    assert [r.outcome for r in www] == ["requeue_after", "error", "error", "converged"]
    assert [r.attempt for r in www] == [0, 0, 1, 2]                   # failures so far, per try
    assert [round(r.at) for r in www] == [0, 30, 32, 36]              # the 30 s requeue, then retries after 2 s and 4 s
    assert [(p.controller, p.key) for p in h.published] == [("audit", "www.example")]
    assert [(p.key, p.reason) for p in h.parked] == [("evil.test", "permanent")]
    assert h.now < 60  # virtual time: the test itself took milliseconds


def test_events_for_a_busy_key_are_coalesced_into_one_follow_up(ctlpool):
    class Slow(Controller):
        name = "slow"

        async def reconcile(self, key: str, event: Any, ctx: Any) -> None:
            await asyncio.sleep(10)  # virtual: instant

    h = ctlpool(Slow())
    h.publish("slow", "k", {"n": 1})
    h.run(1)
    for n in (2, 3, 4):
        h.publish("slow", "k", {"n": n})
    h.run_until_idle()
    assert [(r.event, r.coalesced) for r in h.reconciles] == [({"n": 1}, 0), ({"n": 4}, 2)]
    assert h.reconciles[1].at == pytest.approx(10, abs=0.01)  # after the first, never beside it


def test_max_attempts_parks_with_the_reason_and_backs_off_per_the_policy(ctlpool):
    class Broken(Controller):
        name = "broken"
        retry = RetryPolicy(base_s=4, factor=4, max_delay_s=256, max_attempts=3)

        def reconcile(self, key: str, event: Any, ctx: Any) -> None:  # plain def: the thread pool
            raise RuntimeError("nope")

    h = ctlpool(Broken())
    h.publish("broken", "k")
    h.run_until_idle()
    assert [round(r.at) for r in h.reconciles] == [0, 4, 20]
    [parked] = h.parked
    assert (parked.reason, parked.key) == ("max-attempts", "k") and "after 3 attempts: RuntimeError: nope" in parked.error


def test_a_retry_shorter_than_half_the_smallest_tier_comes_back_at_once(ctlpool):
    class Quick(Controller):
        name = "quick"
        retry = RetryPolicy(base_s=0.2, max_attempts=3)

        async def reconcile(self, key: str, event: Any, ctx: Any) -> None:
            raise RuntimeError("again")

    h = ctlpool(Quick())
    h.publish("quick", "k")
    h.run_until_idle()
    # 0.2 s and 0.4 s are under half the 1 s tier: delivered again at once, not after 0.2 s
    assert [r.at for r in h.reconciles] == [0, 0, 0]


def test_controllers_under_test_talk_to_each_other_others_are_recorded(ctlpool):
    class Ping(Controller):
        name = "ping"

        async def reconcile(self, key: str, event: Any, ctx: Any) -> None:
            if event.get("n", 0) < 3:
                await ctx.publish("pong", key, {"n": event.get("n", 0) + 1})

    class Pong(Controller):
        name = "pong"

        def reconcile(self, key: str, event: Any, ctx: Any) -> None:
            ctx.publish("ping", key, {"n": event["n"] + 1})
            ctx.publish("elsewhere", key, {"n": event["n"]})

    h = ctlpool(Ping(), Pong())
    h.publish("ping", "k", {"n": 0})
    h.run_until_idle()
    assert [r.event["n"] for r in h.reconciles if r.controller == "ping"] == [0, 2, 4]
    assert [r.event["n"] for r in h.reconciles if r.controller == "pong"] == [1, 3]
    assert [(p.controller, p.event) for p in h.published] == [("elsewhere", {"n": 1}), ("elsewhere", {"n": 3})]


def test_a_reconcile_past_its_timeout_is_cancelled_and_retried(ctlpool):
    class Hangs(Controller):
        name = "hangs"
        retry = RetryPolicy(base_s=1, max_attempts=2)

        async def reconcile(self, key: str, event: Any, ctx: Any) -> None:
            await asyncio.Event().wait()  # never

    h = ctlpool(Hangs(), reconcile_timeout_s=30)
    h.publish("hangs", "k")
    h.run_until_idle()
    assert [(p.reason, "exceeded 30s" in p.error) for p in h.parked] == [("max-attempts", True)]
    assert h.now == pytest.approx(62, abs=2)  # 30 s, a 1 s retry, 30 s


def test_a_requeue_that_never_ends_is_reported_not_run_for_ever(ctlpool):
    class Forever(Controller):
        name = "forever"

        async def reconcile(self, key: str, event: Any, ctx: Any) -> Result:
            return Result(requeue_after=60)

    h = ctlpool(Forever())
    h.publish("forever", "k")
    t0 = time.monotonic()
    with pytest.raises(HarnessTimeout):
        h.run_until_idle(limit_s=3600)
    assert 55 <= len(h.reconciles) <= 61 and time.monotonic() - t0 < 5


def test_undecodable_events_are_parked_as_the_pool_would(ctlpool):
    import msgspec

    class Typed(Controller):
        name = "typed"

        class Event(msgspec.Struct):
            image: str

        event_type = Event

        async def reconcile(self, key: str, event: Any, ctx: Any) -> None:
            return None

    h = ctlpool(Typed())
    h.publish("typed", "ok", {"image": "v1"})
    h.publish("typed", "bad", {"replicas": 3})
    h.run_until_idle()
    assert [r.key for r in h.reconciles] == ["ok"]
    assert [(p.key, p.reason) for p in h.parked] == [("bad", "invalid")]


def test_the_harness_needs_no_fixture():
    class Noop(Controller):
        name = "noop"

        async def reconcile(self, key: str, event: Any, ctx: Any) -> None:
            return None

    with Harness(Noop()) as h:
        h.publish("noop", "k")
        h.run_until_idle()
        assert len(h.reconciles) == 1
