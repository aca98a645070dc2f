"""Follow: each controller's live layout (``pool.layout``), read from the broker and applied to the worker.

Data flow: at the start of every session, and every ``READ_TICKS`` ticks after it, ``read_all``
reads each controller's layout queue; a notice on the members exchange (``on_notice``, from
``pool.resize``) makes the worker read that controller's at once. ``apply`` sets the
controller's live partition count, version and pause on its ``Ctl`` (``ctlpool run`` said
already when the count is not ``--partitions``), then asks ``Ownership.rebalance`` to act: a paused controller has all
its partitions released and none taken; a resumed one is assigned over its new count. A
controller with no layout on the broker (declared by an older ctlpool) keeps the count it has.

A resize whose driver died (``ctlpool topology resize`` killed, its host gone) leaves the
controller paused, or half-way: while a layout says a resize is in progress, ``_watch`` looks
every ``WATCH_S``; once its lock has been free for ``TAKEOVER_S``, the live member with the
lowest id (``designated``) finishes it itself (``pool.resize``), so the pools never wait for an
operator to come back.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

from .. import layout as layouts
from ..amqp import ChannelGone, Connection
from ..settings import PoolSettings
from .parts import Ctl

log = logging.getLogger("ctlpool.worker")

READ_TICKS = 30  # a worker reads every layout at least this often (in ticks), should a notice be lost
WATCH_S = 2.0  # a resize in progress is looked at this often
TAKEOVER_S = 10.0  # a resize nobody has driven for this long is finished by a member (its driver died)


class Follow:
    def __init__(self, *, ctls: list[Ctl], clock: Callable[[], float], worker: int, on_change: Callable[[], None],
                 settings: PoolSettings | None = None, designated: Callable[[Ctl], bool] = lambda ctl: False) -> None:
        self._ctls = {c.name: c for c in ctls}
        self._settings = settings
        self._designated = designated
        self._watching: dict[str, asyncio.Task[None]] = {}
        self._clock = clock
        self._worker = worker
        self._on_change = on_change
        self.conn: Connection | None = None  # the session's consume connection
        self._reading: dict[str, asyncio.Task[None]] = {}
        self._ticks = 0

    async def read_all(self) -> None:
        """Read every controller's layout (at the start of a session: before taking any partition)."""
        for ctl in self._ctls.values():
            await self._read(ctl)

    async def _read(self, ctl: Ctl) -> None:
        if self.conn is None:
            return
        live = await layouts.read(self.conn, ctl.names)
        if live is not None:
            self.apply(ctl, live)

    def on_notice(self, body: bytes) -> None:
        """A layout notice on the members exchange: read that controller's layout now (the queue,
        not the notice, is trusted)."""
        notice = layouts.decode(body)
        ctl = self._ctls.get(notice.controller) if notice is not None else None
        if ctl is not None:
            self._read_soon(ctl)

    def tick(self) -> None:
        self._ticks += 1
        if self._ticks % READ_TICKS == 0:
            for ctl in self._ctls.values():
                self._read_soon(ctl)

    def _read_soon(self, ctl: Ctl) -> None:
        if ctl.name in self._reading or self.conn is None:
            return
        task = asyncio.ensure_future(self._read(ctl))
        self._reading[ctl.name] = task

        def done(t: asyncio.Task[None]) -> None:
            self._reading.pop(ctl.name, None)
            exc = None if t.cancelled() else t.exception()
            if exc is not None and not isinstance(exc, ChannelGone):
                log.error("reading the layout of %s failed: %s", ctl.name, exc, extra={"worker": self._worker})
        task.add_done_callback(done)

    def apply(self, ctl: Ctl, live: layouts.Layout) -> None:
        """Make ``live`` the controller's layout on this worker."""
        changed = (live.partitions, live.version, live.paused) != (ctl.partitions, ctl.version, ctl.paused)
        if ctl.paused and not live.paused:
            ctl.resumed_at = self._clock()
        if changed and ctl.version and live.version != ctl.version:
            log.info("controller %s: now %s", ctl.name, live.describe(), extra={"worker": self._worker})
        ctl.partitions, ctl.version, ctl.paused, ctl.resizes = live.partitions, live.version, live.paused, live.resizes
        if changed:
            self._on_change()
        if live.resize is not None and ctl.name not in self._watching and self._settings is not None:
            task = self._watching[ctl.name] = asyncio.ensure_future(self._watch(ctl))
            task.add_done_callback(lambda t: self._watching.pop(ctl.name, None))

    async def _watch(self, ctl: Ctl) -> None:
        """Finish a resize its driver left (see the module docstring)."""
        from ..resize import ResizeRefused, resize

        free_since: float | None = None
        while self.conn is not None:
            await asyncio.sleep(WATCH_S)
            conn = self.conn
            if conn is None:
                return
            live = await layouts.read(conn, ctl.names)
            if live is None or live.resize is None:
                if live is not None:
                    self.apply(ctl, live)
                return
            now = self._clock()
            if await conn.exists("queue", ctl.names.resize_lock):
                free_since = None
                continue
            free_since = now if free_since is None else free_since
            if now - free_since < TAKEOVER_S or not self._designated(ctl):
                continue
            log.warning("the resize of %s was left unfinished (%s); finishing it", ctl.name, live.describe(),
                        extra={"worker": self._worker, "controller": ctl.name})
            s = self._settings
            assert s is not None
            try:
                await resize(s.broker, s.topology, ctl.name, live.resize.to,
                             lambda line: log.info("resize of %s: %s", ctl.name, line,
                                                   extra={"worker": self._worker, "controller": ctl.name}))
            except ResizeRefused as exc:  # another member (or a new resize command) got there first
                log.info("not finishing the resize of %s here: %s", ctl.name, exc, extra={"worker": self._worker})
            free_since = None

    def stop(self) -> None:
        """The session ended: forget reads in flight and resizes watched."""
        for t in [*self._reading.values(), *self._watching.values()]:
            t.cancel()
        self._reading.clear()
        self._watching.clear()
        self.conn = None
