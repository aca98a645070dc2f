"""Unit tests of pool.codec: decoding with and without a msgspec Struct, headers, error text."""

from __future__ import annotations

import msgspec
import pytest

from pool import codec
from pool.codec import (
    BROKER_HEADERS,
    H_ATTEMPT,
    H_DELAY_MS,
    MAX_ERROR_CHARS,
    PARK_INVALID,
    PARK_UNDECODABLE,
    DecodeFailed,
    clean_headers,
    encode,
    make_decoder,
    truncate_error,
)


class DeploymentEvent(msgspec.Struct):
    name: str
    replicas: int = 1
    labels: dict[str, str] = {}


# ---- make_decoder with a Struct ----

def test_valid_body_decodes_to_the_struct() -> None:
    # Given a decoder for a Struct
    decode = make_decoder(DeploymentEvent)
    # When a valid body arrives (one field left to its default)
    event = decode(b'{"name": "web", "replicas": 3}')
    # Then it is the Struct, defaults filled in
    assert event == DeploymentEvent(name="web", replicas=3, labels={})
    assert isinstance(event, DeploymentEvent)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"name": "web", "replicas": "3"}', "Expected `int`, got `str` - at `$.replicas`"),
        (b'{"replicas": 3}', "Object missing required field `name`"),
        (b"[1, 2]", "Expected `object`, got `array`"),
    ],
)
def test_well_formed_json_of_the_wrong_shape_is_invalid(body: bytes, message: str) -> None:
    # Given a decoder for a Struct
    decode = make_decoder(DeploymentEvent)
    # When the body is JSON but does not fit the Struct
    with pytest.raises(DecodeFailed) as info:
        decode(body)
    # Then it fails as invalid, with msgspec's message saying where
    assert info.value.reason == PARK_INVALID
    assert str(info.value) == message


@pytest.mark.parametrize("body", [b"{not json", b"", b"\xff\xfe", b'{"name": "web"} trailing'])
def test_garbage_is_undecodable(body: bytes) -> None:
    # Given a decoder for a Struct
    decode = make_decoder(DeploymentEvent)
    # When the body is not JSON at all
    with pytest.raises(DecodeFailed) as info:
        decode(body)
    # Then it fails as undecodable, with a message
    assert info.value.reason == PARK_UNDECODABLE
    assert str(info.value)


def test_decode_failure_hides_the_msgspec_traceback() -> None:
    # Given a decoder and a bad body
    decode = make_decoder(DeploymentEvent)
    # When decoding fails
    with pytest.raises(DecodeFailed) as info:
        decode(b"nope")
    # Then the error stands alone (no chained msgspec exception in the parked headers' story)
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__


# ---- make_decoder without a type ----

def test_without_a_type_any_json_decodes_to_plain_values() -> None:
    # Given a decoder without an event type
    decode = make_decoder(None)
    # When JSON bodies of several shapes arrive
    # Then they come back as plain Python values
    assert decode(b'{"name": "web", "replicas": "3", "x": [1, 2.5, null, true]}') == {
        "name": "web", "replicas": "3", "x": [1, 2.5, None, True]}
    assert decode(b"[1, 2]") == [1, 2]
    assert decode(b'"just a string"') == "just a string"


def test_without_a_type_garbage_is_still_undecodable() -> None:
    # Given a decoder without an event type
    decode = make_decoder(None)
    # When the body is not JSON
    with pytest.raises(DecodeFailed) as info:
        decode(b"{not json")
    # Then it fails as undecodable
    assert info.value.reason == PARK_UNDECODABLE


# ---- encode ----

@pytest.mark.parametrize(
    "payload",
    [{"name": "web", "replicas": 3}, [1, "two", None], "text", 42, {"nested": {"a": [True, 1.5]}}, {}],
)
def test_encode_round_trips_plain_values(payload: object) -> None:
    # Given a plain JSON-able payload
    # When it is encoded and decoded again
    body = encode(payload)
    # Then it is bytes and comes back equal
    assert isinstance(body, bytes)
    assert make_decoder(None)(body) == payload


def test_encode_round_trips_a_struct() -> None:
    # Given a Struct event
    event = DeploymentEvent(name="web", replicas=2, labels={"team": "payments"})
    # When it is encoded and decoded with its type
    body = encode(event)
    # Then the same event comes back, and the body is plain JSON any client can read
    assert make_decoder(DeploymentEvent)(body) == event
    assert make_decoder(None)(body) == {"name": "web", "replicas": 2, "labels": {"team": "payments"}}


def test_encode_is_compact_utf8() -> None:
    # Given a payload with non-ASCII text
    # When encoded
    # Then the body is compact UTF-8 JSON
    assert encode({"a": "é", "b": [1, 2]}) == '{"a":"é","b":[1,2]}'.encode()


def test_encode_refuses_what_json_cannot_carry() -> None:
    # Given a payload with a value JSON has no form for
    # When encoded
    # Then it fails loudly rather than sending something lossy
    with pytest.raises(TypeError):
        encode({"x": object()})


# ---- clean_headers ----

def test_clean_headers_strips_what_the_broker_added() -> None:
    # Given headers of a dead-lettered message: the broker's and ours
    headers = {
        "x-death": [{"count": 1, "queue": "ctl.c.delay.1s", "reason": "expired"}],
        "x-first-death-exchange": "",
        "x-first-death-queue": "ctl.c.delay.1s",
        "x-first-death-reason": "expired",
        "x-last-death-exchange": "",
        "x-last-death-queue": "ctl.c.delay.1s",
        "x-last-death-reason": "expired",
        "x-delivery-count": 2,
        H_ATTEMPT: 3,
        H_DELAY_MS: 1500,
        "app-header": "kept",
    }
    # When cleaned for a republish
    cleaned = clean_headers(headers)
    # Then only the pool's and the application's headers remain, and the input is untouched
    assert cleaned == {H_ATTEMPT: 3, H_DELAY_MS: 1500, "app-header": "kept"}
    assert "x-death" in headers
    assert BROKER_HEADERS.isdisjoint(cleaned)


@pytest.mark.parametrize("headers", [None, {}])
def test_clean_headers_of_nothing_is_empty(headers: dict[str, object] | None) -> None:
    # Given no headers
    # When cleaned
    cleaned = clean_headers(headers)
    # Then the result is a new, empty dict (safe to add to)
    assert cleaned == {}
    assert cleaned is not headers


# ---- truncate_error ----

def test_short_errors_are_kept_whole() -> None:
    # Given errors up to the limit
    for text in ("", "boom", "x" * MAX_ERROR_CHARS):
        # When truncated
        # Then they are unchanged
        assert truncate_error(text) == text


def test_long_errors_are_cut_to_the_limit_with_an_ellipsis() -> None:
    # Given an error one character over the limit, and a huge one
    for text in ("y" * (MAX_ERROR_CHARS + 1), "z" * 100_000):
        # When truncated
        out = truncate_error(text)
        # Then it is exactly the limit long and says it was cut
        assert len(out) == MAX_ERROR_CHARS
        assert out.endswith("...")
        assert out[:-3] == text[: MAX_ERROR_CHARS - 3]


def test_content_type_is_json() -> None:
    # Given the wire format
    # When a publisher sets the content type
    # Then it says JSON
    assert codec.CONTENT_TYPE == "application/json"
