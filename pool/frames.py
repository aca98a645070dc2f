"""Decoding that a foreign publisher's headers cannot turn into a dead connection.

Data flow: pika turns each socket read into frames (``pika.frame.decode_frame``), and a content
header frame's properties into Python values. Any exception there escapes into the transport,
which aborts the whole connection: every prefetched sibling comes back, and the poison arrives
again. Values that did this on pika 1.3/1.4: a double of ±inf (pika turns doubles into ints),
a timestamp past year 9999, and tables nested deeper than Python's recursion limit.

``install()`` (called once, by ``pool.amqp``) wraps ``BasicProperties.decode``, which pika's
frame decoder calls once per delivery: properties that fail to decode are replaced by
properties carrying only ``codec.H_BAD_FRAME`` (the error); the frame is consumed as usual and
the body frames that follow are untouched, so the delivery arrives whole and the worker parks
it with the reason (``bad-headers``). Method frames are never touched: a broken one means the
stream itself is broken. Values that decode but can't be encoded again (a double of 1e19
becomes an int beyond 2^63) are ``codec.clean_headers``' job.

The wrapper costs one Python call per delivery. It relies on pika 1.x calling
``properties.decode`` from ``pika.frame.decode_frame``, hence pika's upper bound in
``pyproject.toml``; ``tests/unit/test_frames.py`` checks it on the installed pika.
"""

from __future__ import annotations


import pika.spec

from .codec import H_BAD_FRAME, truncate_error

_original = pika.spec.BasicProperties.decode


def _decode(self: pika.spec.BasicProperties, encoded: bytes, offset: int = 0) -> pika.spec.BasicProperties:
    """pika's ``BasicProperties.decode``; properties that fail to decode become a marked header."""
    try:
        return _original(self, encoded, offset)
    except Exception as exc:  # noqa: BLE001 - whatever the values' decoding raised
        self.__init__(headers={H_BAD_FRAME: truncate_error(f"{type(exc).__name__}: {exc}")})  # type: ignore[misc]
        return self


def install() -> None:
    """Put the wrapper in place (idempotent)."""
    pika.spec.BasicProperties.decode = _decode  # type: ignore[method-assign]
