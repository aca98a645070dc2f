"""Wire format: JSON bodies, everything the pool adds in headers.

Any AMQP client can publish an event: exchange ``ctl.CONTROLLER``, routing key = item
key, body = the event as JSON. The pool never rewraps the body; its bookkeeping travels
in the ``x-ctlpool-*`` headers below. A delivery is decoded once, here: with the
controller's msgspec ``Struct`` type (decode and validate in one step) or, without
one, to plain JSON values.
"""

from __future__ import annotations

from typing import Any, Callable

import msgspec
from pika import data as pika_data

CONTENT_TYPE = "application/json"

# Headers the pool reads and writes. Values are ints or short strings.
H_ATTEMPT = "x-ctlpool-attempt"  # failures so far of the event this message carries
H_DELAY_MS = "x-ctlpool-delay-ms"  # delay still to serve after the current tier hop
H_FIRST_MS = "x-ctlpool-first-ms"  # wall-clock ms when the event was first published
H_REDELIVERIES = "x-ctlpool-redeliveries"  # deliveries lost to dead workers, carried across re-routes
H_KEY = "x-ctlpool-key"  # the item key of a parked message (its routing key is the parking queue)
H_REASON = "x-ctlpool-reason"  # why it was parked: one of the PARK_* values
H_ERROR = "x-ctlpool-error"  # the error text behind the reason
H_PARKED_FROM = "x-ctlpool-parked-from"  # partition queue it was parked from
H_PARKED_MS = "x-ctlpool-parked-ms"  # wall-clock ms when parked
H_SEQ = "x-ctlpool-seq"  # publisher sequence, to match a basic.return to its publish
H_DROPPED = "x-ctlpool-dropped-headers"  # names of foreign headers a republish could not carry
H_DROPPED_PROPS = "x-ctlpool-dropped-properties"  # AMQP properties a republish did not carry (``pool.copies``)
H_MISROUTED = "x-ctlpool-misrouted"  # how a re-routed copy had reached a partition other than through the ring
H_BAD_FRAME = "x-ctlpool-bad-frame"  # set by ``pool.frames`` when a delivery's header frame could not be decoded

# AMQP's sender-selected distribution: a copy for each routing key listed. The broker keeps CC in
# what it delivers (BCC it strips), so a key's event can sit in another key's partition.
ROUTING_HEADERS = ("CC", "BCC")

# Headers the broker adds on dead-lettering; a republish strips them (DESIGN fact 6).
BROKER_HEADERS = frozenset(
    {"x-death", "x-first-death-exchange", "x-first-death-queue", "x-first-death-reason",
     "x-last-death-exchange", "x-last-death-queue", "x-last-death-reason", "x-delivery-count"}
)

PARK_MAX_ATTEMPTS = "max-attempts"
PARK_PERMANENT = "permanent"
PARK_UNDECODABLE = "undecodable"
PARK_INVALID = "invalid"
PARK_DELIVERIES = "too-many-deliveries"
PARK_BAD_HEADERS = "bad-headers"
PARK_INTERNAL = "internal-error"
PARK_LOOP_BLOCKED = "loop-blocked"
PARK_BAD_KEY = "bad-key"

MAX_ERROR_CHARS = 2000  # headers live in every frame; a traceback-sized error is enough
MAX_ATTEMPT = 1_000_000  # an attempt count beyond any retry policy; larger header values are forged
MAX_DELAY_MS = 366 * 86_400_000  # a year and a day: longer owed delays are forged or corrupt
MAX_SHORTSTR = 255  # AMQP table keys are short strings


class DecodeFailed(Exception):
    """The body could not be turned into the controller's event; ``reason`` is a PARK_* value."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def make_decoder(event_type: type | None) -> Callable[[bytes], Any]:
    """A function bytes -> event for a controller, raising ``DecodeFailed``."""
    decoder = msgspec.json.Decoder(event_type) if event_type is not None else msgspec.json.Decoder()

    def decode(body: bytes) -> Any:
        try:
            return decoder.decode(body)
        except msgspec.ValidationError as exc:
            raise DecodeFailed(PARK_INVALID, str(exc)) from None
        except msgspec.DecodeError as exc:
            raise DecodeFailed(PARK_UNDECODABLE, str(exc)) from None
        except RecursionError:  # msgspec's answer to JSON nested a few thousand deep
            raise DecodeFailed(PARK_UNDECODABLE, "JSON nested too deeply to decode") from None

    return decode


_encoder = msgspec.json.Encoder()


def encode(payload: Any) -> bytes:
    """Event -> JSON body (Structs, dicts, lists, scalars)."""
    return _encoder.encode(payload)


def clean_headers(headers: dict[str, Any] | None) -> dict[str, Any]:
    """A copy of ``headers`` for a fresh republish: without what the broker added (DESIGN fact 6),
    without ``CC``/``BCC`` (they would copy it to the queues or keys they name once more),
    without our own bookkeeping of the previous hop, and without any value that would not encode
    again (a foreign publisher's double of 1e19 decodes to an int no AMQP type holds, a table
    nested too deep, a key longer than a short string). Dropped names go in ``H_DROPPED``, so a
    republish never fails because of what someone else put in a header."""
    if not headers:
        return {}
    out: dict[str, Any] = {}
    dropped: list[str] = []
    for k, v in headers.items():
        if k in BROKER_HEADERS or k in ROUTING_HEADERS or k == H_SEQ or k == H_DROPPED:
            continue
        if _encodes(k, v):
            out[k] = v
        else:
            dropped.append(k if isinstance(k, str) else repr(k))
    previous = headers.get(H_DROPPED)
    if isinstance(previous, str) and previous:
        dropped.insert(0, previous)
    if dropped:
        out[H_DROPPED] = truncate_error(",".join(dropped))
    return out


def _encodes(key: Any, value: Any) -> bool:
    if not isinstance(key, str) or len(key.encode("utf-8", "surrogatepass")) > MAX_SHORTSTR:
        return False
    try:
        pika_data.encode_table([], {key: value})
    except Exception:  # noqa: BLE001 - struct.error, UnsupportedAMQPFieldException, RecursionError...
        return False
    return True


def header_int(headers: dict[str, Any], name: str, high: int) -> int | None:
    """``headers[name]`` as an int in [0, high], or None when absent, of another type or out of range
    (a forged or corrupt value is ignored, never trusted: it can neither buy attempts nor crash us)."""
    v = headers.get(name)
    if v is None or isinstance(v, bool):
        return None
    if isinstance(v, float):
        if not v == v or v in (float("inf"), float("-inf")):
            return None
        v = int(v)
    if not isinstance(v, int):
        return None
    return v if 0 <= v <= high else None


def truncate_error(text: str) -> str:
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."
