"""Decoding that a foreign publisher's headers cannot turn into a dead connection.

Data flow: pika turns each socket read into frames (``pika.frame.decode_frame``), and a content
header frame's properties into Python values (``pika.data.decode_value``). Any exception there
escapes into the transport, which aborts the whole connection: every prefetched sibling comes
back, and the poison arrives again. Values that did this on pika 1.3/1.4: a double of NaN or
±inf (pika turns doubles into ints), a timestamp past year 9999, and tables nested deeper than
Python's recursion limit.

``install()`` (called once, by ``pool.amqp``) wraps both functions in pika's modules:

- ``decode_value``: doubles and floats that are not finite come back as Python floats, and a
  timestamp ``datetime`` cannot hold comes back as its integer seconds; everything else is
  pika's own decoding. Such values do not encode again, so ``codec.clean_headers`` drops them
  (and names them) when the pool republishes the message.
- ``decode_frame``: a content header frame whose properties still fail to decode is replaced
  by properties carrying only ``codec.H_BAD_FRAME`` (the error); the body frames that follow
  are untouched, so the delivery arrives whole and the worker parks it with the reason.
  Method frames are never replaced: a broken one means the stream itself is broken.

It relies on pika's module layout (``pika.data.decode_value`` looked up at call time by
``decode_table``, ``pika.frame.decode_frame`` by the connection), hence pika's upper bound in
``pyproject.toml``; ``tests/unit/test_frames.py`` checks both on the installed pika.
"""

from __future__ import annotations

import math
import struct
from datetime import datetime, timezone
from typing import Any

import pika.data
import pika.exceptions
import pika.frame
import pika.spec

from .codec import H_BAD_FRAME, truncate_error

_original_value = pika.data.decode_value
_original_frame = pika.frame.decode_frame
_FLOATS = {b"d": (">d", 8), b"f": (">f", 4)}
_INT64 = 2**63


def decode_value(encoded: bytes, offset: int) -> tuple[Any, int]:
    """pika's ``decode_value``, without the values that make it raise (see the module docstring)."""
    kind = encoded[offset:offset + 1]
    fmt = _FLOATS.get(kind)
    if fmt is not None:
        (x,) = struct.unpack_from(fmt[0], encoded, offset + 1)
        # pika's own answer is int(x); keep it where int() and the AMQP long-long can hold it
        value: Any = int(x) if math.isfinite(x) and -_INT64 <= x < _INT64 else x
        return value, offset + 1 + fmt[1]
    if kind == b"T":
        (seconds,) = struct.unpack_from(">Q", encoded, offset + 1)
        try:
            value = datetime.fromtimestamp(seconds, timezone.utc)
        except (OverflowError, ValueError, OSError):
            value = seconds
        return value, offset + 9
    return _original_value(encoded, offset)


def decode_frame(data_in: bytes) -> tuple[int, Any]:
    """pika's ``decode_frame``; a content header whose properties fail becomes a marked header."""
    try:
        return _original_frame(data_in)
    except Exception as exc:  # noqa: BLE001 - whatever the properties' decoding raised
        if isinstance(exc, pika.exceptions.InvalidFrameError) or data_in[0] != pika.spec.FRAME_HEADER:
            raise
        channel, size = struct.unpack_from(">HL", data_in, 1)
        end = pika.spec.FRAME_HEADER_SIZE + size + pika.spec.FRAME_END_SIZE
        body_size = struct.unpack_from(">Q", data_in, pika.spec.FRAME_HEADER_SIZE + 4)[0]
        props = pika.spec.BasicProperties(headers={
            H_BAD_FRAME: truncate_error(f"{type(exc).__name__}: {exc}")})
        return end, pika.frame.Header(channel, body_size, props)


def install() -> None:
    """Put the wrappers in place (idempotent)."""
    pika.data.decode_value = decode_value
    pika.frame.decode_frame = decode_frame
