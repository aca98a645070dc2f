"""The worker's rooms on the in-memory broker of ``pool.testing.broker`` (the same one the
user-facing ``pool.testing.Harness`` routes through), driven by hand: the test delivers, and
decides when the broker confirms (``Wire.confirm``), then checks what the worker did before and
after. The rooms are built by ``Worker._build`` exactly as in production.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable

from pool.controller import Controller
from pool.settings import resolve
from pool.testing.broker import FakeChannel, FakeConnection, FakeSession, Wire
from pool.worker import Worker
from pool.worker.parts import Partition


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Rig:
    """A worker's rooms wired as in production, bound to a fake session; run inside a loop."""

    def __init__(self, controller: Controller, *, clean: bool = True, auto_confirm: bool = False,
                 **flags: Any) -> None:
        self.clock = Clock()
        settings = resolve({"node-id": "n1", "partitions": 4, "prefetch": 10, **flags}, env={})
        self.worker = Worker(settings=settings, controllers=[controller], clock=self.clock, wall=lambda: 1.7e9,
                             rand=lambda: 0.5)
        self.wire = Wire(auto_confirm)
        self.conn = FakeConnection(self.wire, clean)
        self.session = FakeSession(self.wire, self.conn, self.clock)
        self.settler, self.intake, self.dispatch, self.ownership = self.worker._build(asyncio.get_running_loop())
        self.settler.pub = self.session.pub  # type: ignore[assignment]
        self.dispatch.lease, self.dispatch.running = self.session.lease, True
        self.dispatch.conn = self.conn  # type: ignore[assignment]
        self.ownership.bind(self.session)  # type: ignore[arg-type]
        self.ctl = self.worker.ctls[0]

    async def partition(self, index: int = 0) -> tuple[Partition, FakeChannel]:
        """Acquire ``index`` through ``Ownership`` (the fake broker grants it at once)."""
        await self.ownership.acquire(self.ctl, index)
        part = self.ownership.parts[(0, index)]
        return part, part.ch  # type: ignore[return-value]


async def turns(n: int = 50) -> None:
    """Let the loop run every callback that is ready, ``n`` times over (nothing here waits on time)."""
    for _ in range(n):
        await asyncio.sleep(0)


async def until(cond: Callable[[], bool], what: str, n: int = 500) -> None:
    for _ in range(n):
        if cond():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"never happened: {what}")
