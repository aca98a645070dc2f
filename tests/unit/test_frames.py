"""pool.frames on the installed pika: values and frames that made pika raise decode instead."""

import struct

import pytest

import pika.frame
import pika.spec

from pool import codec, frames

frames.install()


def _header_frame(headers_table: bytes, body_size: int = 2) -> bytes:
    # class 60 (basic), weight 0, body size, property flags: headers only (bit 13), then the table
    payload = struct.pack(">HHQH", 60, 0, body_size, 1 << 13) + struct.pack(">I", len(headers_table)) + headers_table
    return struct.pack(">BHL", pika.spec.FRAME_HEADER, 1, len(payload)) + payload + bytes([pika.spec.FRAME_END])


def _field(name: str, value: bytes) -> bytes:
    return bytes([len(name)]) + name.encode() + value


@pytest.mark.parametrize("value", [b"T" + struct.pack(">Q", 2**62), b"T" + struct.pack(">Q", 1733650000000),
                                   b"d" + struct.pack(">d", float("inf")), b"f" + struct.pack(">f", float("-inf"))],
                         ids=["timestamp past 9999", "timestamp in milliseconds", "infinite double", "infinite float"])
def test_a_header_value_pika_cannot_decode_is_dropped_and_named_the_rest_kept(value):
    # Given a content header with a value a non-pika publisher can send and pika can't decode,
    # beside good ones (one nested, holding a bad value too)
    nested = _field("y", value)
    table = (_field("x-when", value) + _field("k", b"I" + struct.pack(">i", 5))
             + _field("t", b"F" + struct.pack(">I", len(nested)) + nested))
    data = _header_frame(table)
    # When the connection's frame decoder reads it
    consumed, frame = pika.frame.decode_frame(data)
    # Then it is consumed whole; the unreadable headers are dropped and named; the rest is kept
    assert consumed == len(data)
    assert frame.properties.headers == {"k": 5, codec.H_DROPPED: "x-when,t"}
    # and the tolerant pass left pika's own decoder in place
    assert pika.data.decode_value is frames._decode_value


def test_a_value_that_decodes_but_cannot_be_sent_again_is_dropped_on_republish():
    _, frame = pika.frame.decode_frame(_header_frame(_field("a", b"d" + struct.pack(">d", 1e19))))
    assert frame.properties.headers == {"a": 10**19}  # pika's own answer: an int no AMQP type holds
    assert codec.clean_headers({**frame.properties.headers, "b": 1}) == {"b": 1, codec.H_DROPPED: "a"}


def test_a_header_frame_that_cannot_decode_becomes_a_marked_header():
    # Given a content header whose table is nested deeper than Python's recursion limit
    table = b""
    for _ in range(3000):
        inner = table
        table = _field("x", b"F" + struct.pack(">I", len(inner)) + inner)
    data = _header_frame(table) + b"trailing"
    # When pika's frame decoder (as the connection calls it) reads it
    consumed, frame = pika.frame.decode_frame(data)
    # Then the frame is consumed whole, and the delivery carries the reason instead of the headers
    assert consumed == len(data) - len(b"trailing")
    assert isinstance(frame, pika.frame.Header) and frame.body_size == 2
    assert "RecursionError" in frame.properties.headers[codec.H_BAD_FRAME]


def test_a_good_header_frame_is_pika_s_own():
    consumed, frame = pika.frame.decode_frame(_header_frame(_field("k", b"I" + struct.pack(">i", 5))))
    assert frame.properties.headers == {"k": 5}
