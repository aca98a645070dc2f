"""A republished copy of a message: every AMQP property it came with, fitted into one header frame.

Data flow: the worker republishes deliveries (a re-route, a delay hop, a retry, a parked copy),
and ``ctlpool parked replay`` parked ones. ``properties(original, headers)`` builds the copy's
properties from the original's: all of them (message-id, correlation-id, reply-to, type,
app-id, timestamp, priority, content type and encoding...) but two, named in
``x-ctlpool-dropped-properties``:

- ``expiration``: a publisher's per-message TTL. A copy riding a delay tier would expire there
  and come back early, and one waiting in a partition again would be dead-lettered again;
- ``user_id``: the broker refuses a message whose user-id is not the publishing connection's
  login, closing the channel (406): the pool's own login is not the publisher's.

``fit(props, frame_max)`` then makes the whole content header fit the ``frame_max`` the
connection negotiated: the broker closes a connection that sends a larger frame (501
FRAME_ERROR), and every delivery prefetched on it comes back. A header a few bytes under the
limit when a foreign publisher sent it goes over once our ``x-ctlpool-*`` headers are added, so
foreign headers are dropped first, largest first (named in ``x-ctlpool-dropped-headers``), then
the optional properties; our own texts are cut short last. ``FrameTooLarge`` only when even the
bare bookkeeping can't fit (a frame_max below any real broker's 4096).
"""

from __future__ import annotations

from typing import Any

import pika
from pika import data as pika_data

from .codec import CONTENT_TYPE, H_DROPPED, H_DROPPED_PROPS, H_ERROR, H_SEQ, MAX_ERROR_CHARS, truncate_error

PERSISTENT = 2  # AMQP delivery_mode

# The properties a copy keeps as they were (delivery_mode is always persistent; headers are rebuilt).
KEPT = ("content_type", "content_encoding", "priority", "correlation_id", "reply_to", "message_id", "timestamp",
        "type", "app_id", "cluster_id")
DROPPED = ("expiration", "user_id")  # see the module docstring
# Optional properties given up, in this order, when the header frame is still too large.
SHED = ("cluster_id", "app_id", "type", "reply_to", "correlation_id", "message_id", "content_encoding")

FRAME_OVERHEAD = 8  # frame type, channel, size, end marker
HEADER_FIXED = 12  # class id, weight, body size (the property flags are in ``encode()``)
SEQ_SIZE = 1 + len(H_SEQ) + 1 + 8  # the confirm sequence header ``ConfirmChannel.publish`` adds: key, 'l', int64
SHORT_ERROR = 200  # how much of our error text a copy keeps when even that does not fit


class FrameTooLarge(Exception):
    """Even the copy's own bookkeeping does not fit the negotiated frame_max."""


def properties(original: Any, headers: dict[str, Any]) -> pika.BasicProperties:
    """The copy's properties: the original's (see the module docstring) with ``headers``."""
    props = pika.BasicProperties(delivery_mode=PERSISTENT, headers=headers)
    if original is None:
        props.content_type = CONTENT_TYPE
        return props
    for name in KEPT:
        value = getattr(original, name, None)
        if value is not None:
            setattr(props, name, value)
    dropped = [f"{name}={getattr(original, name)}"[:80] for name in DROPPED if getattr(original, name, None)]
    if dropped:
        headers[H_DROPPED_PROPS] = ",".join(dropped)
    return props


def header_size(props: pika.BasicProperties) -> int:
    """Bytes of the content header frame ``props`` make, with the confirm sequence added later."""
    return FRAME_OVERHEAD + HEADER_FIXED + SEQ_SIZE + sum(len(p) for p in props.encode())


def fit(props: pika.BasicProperties, frame_max: int) -> pika.BasicProperties:
    """``props``, made to fit ``frame_max`` (see the module docstring); changed in place."""
    size = header_size(props)
    if size <= frame_max:
        return props
    headers: dict[str, Any] = props.headers if props.headers is not None else {}
    foreign = sorted((k for k in headers if not str(k).startswith("x-ctlpool-")),
                     key=lambda k: -_entry_size(k, headers[k]))
    dropped: list[str] = []
    for k in foreign:
        if size <= frame_max:
            break
        size -= _entry_size(k, headers.pop(k))
        dropped.append(str(k))
    if dropped:
        _name_dropped(headers, dropped)
        size = header_size(props)
    for name in SHED:
        if size <= frame_max:
            break
        if getattr(props, name) is not None:
            setattr(props, name, None)
            prev = headers.get(H_DROPPED_PROPS)
            headers[H_DROPPED_PROPS] = f"{prev},{name}" if prev else name
            size = header_size(props)
    for name in (H_ERROR, H_DROPPED, H_DROPPED_PROPS):
        if size > frame_max and isinstance(headers.get(name), str):
            headers[name] = headers[name][:SHORT_ERROR]
            size = header_size(props)
    if size > frame_max:
        raise FrameTooLarge(f"a copy's own headers take {size} bytes, over the connection's frame_max {frame_max}")
    return props


def _entry_size(key: Any, value: Any) -> int:
    try:
        return pika_data.encode_table([], {key: value}) - 4  # less the table's own length field
    except Exception:  # noqa: BLE001 - clean_headers dropped what can't be encoded; count it as nothing
        return 0


def _name_dropped(headers: dict[str, Any], names: list[str]) -> None:
    previous = headers.get(H_DROPPED)
    text = ",".join(([previous] if isinstance(previous, str) and previous else []) + names)
    headers[H_DROPPED] = truncate_error(text) if len(text) > MAX_ERROR_CHARS else text
