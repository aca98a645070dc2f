"""A controller's live layout: how many partitions it has now, and a resize in progress, kept on the broker.

Data flow: the layout is one small JSON message in the durable queue ``ctl.C.layout`` (quorum
when the controller's queues are: it must outlive a node), written by ``pool.topology`` when
the controller is first declared and by ``pool.resize`` at each step of a resize; every
process reads it there (``read``), so the count is the broker's, never a flag's. A write
publishes the new state (confirmed), then removes every older one (``write``); a read takes
every message, keeps the newest version and puts them all back, so two readers at once see
nothing for a moment and try again (a queue that exists always holds a layout: ``read`` is
never empty for long). Pools hear of a change at once through a notice on the members exchange
(``notice``: the same JSON, AMQP type ``layout``), then read the queue, which alone is trusted.

``Layout.resize`` is the state machine of ``pool.resize`` (``Resize.step``):

    pause  -> every member releases the controller's partitions and takes none
    rebind -> the driver binds new partitions (grow) or unbinds and drains the highest (shrink)
    resume -> members consume the new count (``partitions`` is already the new one); done once all do
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgspec
import msgspec.structs
import pika

from .amqp import NOT_FOUND, ChannelGone, Connection
from .names import Names

KIND = "layout"  # the AMQP ``type`` of a notice on the members exchange
READ_RETRY_S = 0.05  # a read that found the layout held by another reader tries again after this...
READ_TIMEOUT_S = 10.0  # ...until this long has passed
STEPS = ("pause", "rebind", "resume")


class Resize(msgspec.Struct, frozen=True, omit_defaults=True):
    """A resize in progress (see the module docstring)."""

    to: int
    """The partition count it moves to."""
    step: str
    """One of ``STEPS``."""
    source: int
    """The count it moves from."""
    by: str = ""
    """Who started it (``host:pid``), for the line a second resize prints."""
    since: float = 0.0
    """Wall clock when it started."""


class Layout(msgspec.Struct, frozen=True, omit_defaults=True):
    controller: str
    partitions: int
    """Partition queues p000 .. p(partitions-1) that the ring routes to now."""
    version: int = 1
    """Bumped by every completed resize (members announce the version they consume)."""
    resize: Resize | None = None
    resizes: int = 0
    """Resizes completed (a metric)."""
    seq: int = 0
    """Bumped by every write: of the copies a read finds, the highest is the live one."""

    @property
    def paused(self) -> bool:
        """Members must hold none of the controller's partitions."""
        return self.resize is not None and self.resize.step in ("pause", "rebind")

    def describe(self) -> str:
        text = f"{self.partitions} partitions, layout version {self.version}"
        if self.resize is not None:
            r = self.resize
            text += f"; resize {r.source} -> {r.to} in progress, step {r.step}" + (f" (started by {r.by})" if r.by else "")
        return text


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Layout)


def encode(layout: Layout) -> bytes:
    return _encoder.encode(layout)


def decode(body: bytes) -> Layout | None:
    """A layout, or None for anything else (never raises)."""
    try:
        return _decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


async def exists(conn: Connection, names: Names) -> bool:
    return await conn.exists("queue", names.layout)


async def read(conn: Connection, names: Names) -> Layout | None:
    """The live layout, or None when the controller has none (declared before layouts, or not at all)."""
    deadline = time.monotonic() + READ_TIMEOUT_S
    while True:
        ch = await conn.channel()
        try:
            held = await _take_all(ch, names.layout)
        except ChannelGone as exc:
            if exc.reply_code == NOT_FOUND:
                return None
            raise
        finally:
            await ch.close()  # puts back everything taken, in order
        layouts = [lay for lay in (decode(body) for _tag, body in held) if lay is not None]
        if layouts:
            return max(layouts, key=lambda lay: lay.seq)
        if time.monotonic() > deadline:
            raise ChannelGone(0, f"the layout queue {names.layout} stayed empty for {READ_TIMEOUT_S:.0f}s")
        await asyncio.sleep(READ_RETRY_S)


async def _take_all(ch: Any, queue: str) -> list[tuple[int, bytes]]:
    out = []
    while True:
        ok = await ch.get(queue)
        if ok is None:
            return out
        out.append(ok)


async def write(conn: Connection, names: Names, layout: Layout, queue_args: dict[str, Any]) -> Layout:
    """Make ``layout`` the live one (its ``seq`` one past the one given): declare the queue with
    ``queue_args`` if it does not exist yet, publish it (confirmed), then remove every other
    message (older states; a copy a reader holds comes back, and loses to this one's ``seq``).
    Returns what was written."""
    layout = msgspec.structs.replace(layout, seq=layout.seq + 1)
    body = encode(layout)
    if not await conn.exists("queue", names.layout):
        ch0 = await conn.channel()
        try:
            await ch0.rpc("queue_declare", queue=names.layout, durable=True, arguments=queue_args)
        finally:
            await ch0.close()
    ch = await conn.confirm_channel()
    try:
        await ch.publish("", names.layout, body, properties=pika.BasicProperties(
            content_type="application/json", delivery_mode=2, type=KIND))
        for tag, old in await _take_all(ch.ch, names.layout):
            if old != body:
                ch.ch.raw.basic_ack(tag)
    finally:
        await ch.ch.close()  # what was not acked (the new state) goes back
    return layout


def notice(ch: Any, members_exchange: str, layout: Layout) -> None:
    """Tell every member at once (not persistent, not confirmed: they also read it every tick)."""
    ch.raw.basic_publish(members_exchange, "", encode(layout), pika.BasicProperties(type=KIND))
