"""pool.wire on pika's real plaintext transport over a socketpair: fewer sends, same bytes, full sockets."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest
import uvloop
from pika.adapters.asyncio_connection import _AsyncioIOServicesAdapter
from pika.adapters.utils.io_services_utils import _AsyncPlaintextTransport

from pool import wire

LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


class Sink:
    """The protocol side pika's transport talks to; nothing arrives in these tests."""

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, error: Any) -> None:
        pass


def transport(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> tuple[Any, list[int]]:
    """A pika transport on ``sock``, coalesced, with every ``send`` it makes counted."""
    sock.setblocking(False)
    t = _AsyncPlaintextTransport(sock, Sink(), _AsyncioIOServicesAdapter(loop))
    sends: list[int] = []
    real = t._sigint_safe_send

    def counted(s: socket.socket, data: bytes) -> int:
        n = real(s, data)
        sends.append(n)
        return n
    t._sigint_safe_send = counted
    assert wire.coalesce(t, loop)
    return t, sends


async def read_exactly(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int) -> bytes:
    got = bytearray()
    while len(got) < n:
        got += await asyncio.wait_for(loop.sock_recv(sock, 65536), 5)
    return bytes(got)


@pytest.mark.parametrize("kind", sorted(LOOPS))
def test_frames_written_in_one_iteration_leave_in_one_send_in_order(kind: str) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair()
        b.setblocking(False)
        t, sends = transport(loop, a)
        frames = [b"method-%03d|" % i for i in range(300)]  # 100 publishes' worth of frames
        for f in frames:
            t.write(f)
        assert sends == []  # nothing yet: the flush runs once this callback is over
        data = await read_exactly(loop, b, sum(map(len, frames)))
        assert data == b"".join(frames)
        assert len(sends) == 1 and t.get_write_buffer_size() == 0
        t.write(b"later")  # a new iteration: a new flush
        assert await read_exactly(loop, b, 5) == b"later" and len(sends) == 2
        a.close()
        b.close()
    with asyncio.Runner(loop_factory=LOOPS[kind]) as r:
        r.run(main())


@pytest.mark.parametrize("kind", sorted(LOOPS))
def test_a_full_socket_is_drained_by_the_loop_later_nothing_lost(kind: str) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair()
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        b.setblocking(False)
        t, sends = transport(loop, a)
        chunks = [bytes([i % 251]) * 1000 for i in range(3000)]  # 3 MB: far more than the socket holds
        for c in chunks:
            t.write(c)
        await asyncio.sleep(0.05)
        left = t.get_write_buffer_size()
        assert 0 < left < 3_000_000  # some sent, the rest waits for the peer to read
        data = await read_exactly(loop, b, 3_000_000)  # reading lets the loop's writer send the rest
        assert data == b"".join(chunks)
        await asyncio.sleep(0.01)
        assert t.get_write_buffer_size() == 0
        assert max(sends) <= wire.JOIN_LIMIT
        t.write(b"after")  # back to flushing once per iteration
        assert await read_exactly(loop, b, 5) == b"after"
        a.close()
        b.close()
    with asyncio.Runner(loop_factory=LOOPS[kind]) as r:
        r.run(main())


def test_a_transport_it_does_not_know_is_left_alone() -> None:
    class Other:
        def write(self, data: bytes) -> None:
            pass
    other = Other()
    loop = asyncio.new_event_loop()
    try:
        assert not wire.coalesce(other, loop)
        assert "write" not in vars(other)
    finally:
        loop.close()


def test_connect_tries_every_node_of_a_list_and_names_each_when_all_refuse():
    # Given a cluster list whose nodes all refuse connections (nothing listens on ports 1 and 2)
    from pool.amqp import connect
    from pool.errors import BrokerUnavailable

    async def main() -> str:
        try:
            await connect("amqp://u:secret@127.0.0.1:1/vh, amqp://u:secret2@127.0.0.1:2/vh", name="t")
        except BrokerUnavailable as exc:
            return str(exc)
        raise AssertionError("connected to nothing")
    # When a connection is opened, Then both were tried, each named, no password shown
    text = asyncio.run(main())
    assert "no RabbitMQ node of 2 reachable" in text and ":1/vh" in text and ":2/vh" in text
    assert "secret" not in text
