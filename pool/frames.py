"""Decoding that a foreign publisher's headers cannot turn into a dead connection or a lost event.

Data flow: pika turns each socket read into frames (``pika.frame.decode_frame``), and a content
header frame's properties into Python values. Any exception there escapes into the transport,
which aborts the whole connection: every prefetched sibling comes back, and the poison arrives
again. Values that did this on pika 1.3/1.4: a double of ±inf (pika turns doubles into ints),
a header timestamp that is no date (past year 9999: a Node.js publisher's milliseconds give year
58,905), and tables nested deeper than Python's recursion limit.

``install()`` (called once, by ``pool.amqp``) wraps ``BasicProperties.decode``, which pika's
frame decoder calls once per delivery. When pika's decoding fails, the properties are decoded
again with the values pika can't represent (those timestamps and infinite doubles) read as
``Unreadable``; those headers are dropped and named in ``codec.H_DROPPED``, and the event goes on
to its reconcile like any other: they are not poison, only unreadable here. What still fails
(a table nested too deep) becomes properties carrying only ``codec.H_BAD_FRAME`` (the error),
and the worker parks it (``bad-headers``). Either way the frame is consumed as usual and the
body frames that follow are untouched. Method frames are never touched: a broken one means the
stream itself is broken. Values that decode but can't be encoded again (a double of 1e19
becomes an int beyond 2^63) are ``codec.clean_headers``' job.

The wrapper costs one Python call per delivery. It relies on pika 1.x calling
``properties.decode`` from ``pika.frame.decode_frame``, and on ``pika.data.decode_table``
looking up ``decode_value`` in its module (the second pass swaps it for a moment, on the loop's
thread, the only one that decodes frames), hence pika's upper bound in ``pyproject.toml``;
``tests/unit/test_frames.py`` checks both on the installed pika.
"""

from __future__ import annotations

import math
import struct
from datetime import datetime, timezone
from typing import Any

import pika.data
import pika.spec

from .codec import H_BAD_FRAME, H_DROPPED, truncate_error

_original = pika.spec.BasicProperties.decode
_decode_value = pika.data.decode_value


class Unreadable:
    """A header value pika cannot represent; ``what`` says what it was."""

    __slots__ = ("what",)

    def __init__(self, what: str) -> None:
        self.what = what


def _tolerant_value(encoded: bytes, offset: int) -> tuple[Any, int]:
    """pika's ``decode_value``, but a timestamp past year 9999 or an infinite/NaN float is ``Unreadable``."""
    kind = encoded[offset:offset + 1]
    if kind == b"T":
        seconds = struct.unpack_from(">Q", encoded, offset + 1)[0]
        try:
            return datetime.fromtimestamp(seconds, timezone.utc), offset + 9
        except (OverflowError, ValueError, OSError):
            return Unreadable(f"timestamp {seconds}"), offset + 9
    if kind in (b"d", b"f"):
        fmt, size = (">d", 8) if kind == b"d" else (">f", 4)
        x = struct.unpack_from(fmt, encoded, offset + 1)[0]
        if not math.isfinite(x):
            return Unreadable(f"float {x}"), offset + 1 + size
    return _decode_value(encoded, offset)


def _readable(value: Any) -> bool:
    if isinstance(value, Unreadable):
        return False
    if isinstance(value, dict):
        return all(_readable(v) for v in value.values())
    if isinstance(value, list):
        return all(_readable(v) for v in value)
    return True


def _decode(self: pika.spec.BasicProperties, encoded: bytes, offset: int = 0) -> pika.spec.BasicProperties:
    """pika's ``BasicProperties.decode``, made tolerant (see the module docstring)."""
    try:
        return _original(self, encoded, offset)
    except Exception as exc:  # noqa: BLE001 - whatever the values' decoding raised
        first = exc
    pika.data.decode_value = _tolerant_value
    try:
        _original(self, encoded, offset)
    except Exception:  # noqa: BLE001 - still undecodable: the worker parks it
        self.__init__(headers={H_BAD_FRAME: truncate_error(f"{type(first).__name__}: {first}")})  # type: ignore[misc]
        return self
    finally:
        pika.data.decode_value = _decode_value
    headers = self.headers or {}
    dropped = [str(k) for k, v in headers.items() if not _readable(v)]
    kept = {k: v for k, v in headers.items() if _readable(v)}
    kept[H_DROPPED] = truncate_error(",".join(dropped))
    self.headers = kept
    return self


def install() -> None:
    """Put the wrapper in place (idempotent)."""
    pika.spec.BasicProperties.decode = _decode  # type: ignore[method-assign]
