"""pool.frames on the installed pika: values and frames that made pika raise decode instead."""

import struct

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


def test_doubles_and_timestamps_pika_cannot_hold_decode():
    # Given the field encodings a non-pika publisher can send
    huge = b"d" + struct.pack(">d", 1e19)
    nan = b"d" + struct.pack(">d", float("nan"))
    late = b"T" + struct.pack(">Q", 2**62)
    # When decoded
    # Then they come back as values (not exceptions), which clean_headers then drops and names
    assert frames.decode_value(huge, 0) == (10**19, 9)
    value, end = frames.decode_value(nan, 0)
    assert value != value and end == 9
    assert frames.decode_value(late, 0) == (2**62, 9)
    assert codec.clean_headers({"a": 10**19, "b": 1}) == {"b": 1, codec.H_DROPPED: "a"}


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
