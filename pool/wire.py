"""Fewer, larger socket writes for pika's plaintext asyncio transport.

pika hands every AMQP frame to its transport as a separate ``write``: a publish is three
frames (method, header, body), an ack one. The transport buffers them, registers a writer
callback with the loop when its buffer was empty, and when the socket turns writable sends
the buffered frames one ``send`` each before unregistering. Under a paced load (one event at
a time, the common case in production) that is, per publish, an ``epoll_ctl`` to watch the
socket, a loop wake-up, three ``send`` calls (three TCP segments the broker must read one by
one) and an ``epoll_ctl`` to stop watching.

``coalesce(transport, loop)`` changes one connection's transport (not pika's classes: other
pika connections in the process are untouched) so that a write into an empty buffer schedules
one flush with ``loop.call_soon``: everything written by the callbacks of the current loop
iteration leaves in a single ``send`` of the joined frames, right away, without a writer
callback. Only when the socket will not take it all (a full send buffer) does the flush fall
back to pika's own writer path, which sends the rest as the socket drains (also joined) and
unregisters itself when done. Bytes and their order are unchanged.

It reaches into pika's transport internals (``_tx_buffers``, ``_tx_buffered_byte_count``,
``_state``, ``_sigint_safe_send``, ``_initiate_abort``, ``_on_socket_writable``), so it checks
for them first and leaves a transport it does not recognise (TLS, a future pika) as it was;
``tests/unit/test_wire.py`` and ``tests/broker`` exercise it on the installed pika.
"""

from __future__ import annotations

import asyncio
import collections
import errno
from typing import Any

JOIN_LIMIT = 64 * 1024
"""Largest single ``send`` assembled from buffered frames: under a backlog the buffer can hold
hundreds of KiB, and a partial send re-buffers its remainder, so joins stay bounded."""

_AGAIN = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR, errno.ENOBUFS})
_NEEDS = ("_tx_buffers", "_tx_buffered_byte_count", "_state", "_STATE_ACTIVE", "_sock", "_nbio",
          "_sigint_safe_send", "_initiate_abort", "_on_socket_writable", "_buffer_tx_data")


def _send_all(t: Any) -> None:
    """Send buffered data, joined into chunks of at most ``JOIN_LIMIT``, until done or the socket is full.

    Raises what ``send`` raises; a full socket shows as a short send or an EAGAIN-family error."""
    bufs: collections.deque[bytes] = t._tx_buffers
    while bufs:
        if len(bufs) > 1 and len(bufs[0]) < JOIN_LIMIT:
            parts = [bufs.popleft()]
            size = len(parts[0])
            while bufs and size + len(bufs[0]) <= JOIN_LIMIT:
                size += len(bufs[0])
                parts.append(bufs.popleft())
            bufs.appendleft(b"".join(parts))
        chunk = bufs[0]
        sent = t._sigint_safe_send(t._sock, chunk)
        t._tx_buffered_byte_count -= sent
        if sent < len(chunk):
            bufs[0] = chunk[sent:]
            return
        bufs.popleft()


def coalesce(transport: Any, loop: asyncio.AbstractEventLoop) -> bool:
    """Make ``transport`` (a connected pika plaintext transport) send once per loop iteration.

    Returns False, changing nothing, when the transport is not the kind this was written for."""
    if type(transport).__name__ != "_AsyncPlaintextTransport" or not all(hasattr(transport, a) for a in _NEEDS):
        return False
    t = transport
    fd = t._sock.fileno()
    pending = False
    writer_on = False  # pika's writable callback registered by us (the socket was full)

    def send() -> bool:
        """Send what the socket takes; False when the connection failed (pika then aborts it)."""
        try:
            _send_all(t)
        except OSError as exc:
            if exc.errno not in _AGAIN:
                t._initiate_abort(exc)
                return False
        return True

    def on_writable() -> None:
        nonlocal writer_on
        if t._state == t._STATE_ACTIVE and send() and not t._tx_buffers:
            t._nbio.remove_writer(fd)
            writer_on = False

    def flush() -> None:
        nonlocal pending, writer_on
        pending = False
        if t._state != t._STATE_ACTIVE or writer_on or not t._tx_buffers:
            return
        if send() and t._tx_buffers:  # the socket is full: let the loop tell us when it drains
            writer_on = True
            t._nbio.set_writer(fd, on_writable)

    def write(data: bytes) -> None:
        nonlocal pending
        if t._state != t._STATE_ACTIVE:
            return  # as pika: writes after the transport failed or closed are dropped
        t._buffer_tx_data(data)
        if not pending and not writer_on:
            pending = True
            loop.call_soon(flush)

    t.write = write
    t._on_socket_writable = on_writable
    if t._tx_buffers:  # pika's writer may be registered: put ours in its place (same fd, replaced)
        writer_on = True
        t._nbio.set_writer(fd, on_writable)
    return True
