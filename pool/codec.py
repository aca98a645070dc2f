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

MAX_ERROR_CHARS = 2000  # headers live in every frame; a traceback-sized error is enough


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

    return decode


_encoder = msgspec.json.Encoder()


def encode(payload: Any) -> bytes:
    """Event -> JSON body (Structs, dicts, lists, scalars)."""
    return _encoder.encode(payload)


def clean_headers(headers: dict[str, Any] | None) -> dict[str, Any]:
    """A copy of ``headers`` without what the broker added, for a fresh republish."""
    if not headers:
        return {}
    return {k: v for k, v in headers.items() if k not in BROKER_HEADERS}


def truncate_error(text: str) -> str:
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."
