"""pool.copies: a republished copy keeps the original's properties and always fits the frame."""

from __future__ import annotations

import datetime

import pika
import pytest

from pool import codec, copies


def original(**props):
    return pika.BasicProperties(content_type="application/json", **props)


def test_a_copy_keeps_every_property_but_expiration_and_user_id_which_it_names():
    # Given a message with every property a publisher may set
    props = original(content_encoding="gzip", priority=5, correlation_id="c-1", reply_to="replies", expiration="60000",
                     message_id="m-1", timestamp=1_733_650_000_000, type="deploy", user_id="alice", app_id="web",
                     cluster_id="eu")
    # When the worker makes a copy of it (a retry, a parked copy, a re-route)
    headers: dict = {"x-mine": 1}
    copy = copies.properties(props, headers)
    # Then every property is the original's, persistent, but the two that can't travel, named
    for name in copies.KEPT:
        assert getattr(copy, name) == getattr(props, name), name
    assert copy.delivery_mode == 2 and copy.expiration is None and copy.user_id is None
    assert headers[codec.H_DROPPED_PROPS] == "expiration=60000,user_id=alice"
    assert copy.headers is headers


def test_a_copy_of_ours_is_json_and_persistent():
    copy = copies.properties(None, {})
    assert (copy.content_type, copy.delivery_mode) == (codec.CONTENT_TYPE, 2)


def test_a_header_just_under_the_frame_goes_over_with_our_headers_and_is_dropped_largest_first():
    # Given a delivery whose header frame was 16 bytes under frame_max when the publisher sent it
    frame_max = 131_072
    big, small = "x-blob", "x-small"
    headers = {small: "s" * 100, big: ""}
    headers[big] = "b" * (frame_max - 16 - copies.header_size(original(headers=dict(headers))) + copies.SEQ_SIZE)
    sent = original(headers=dict(headers))
    assert frame_max - 20 <= copies.header_size(sent) - copies.SEQ_SIZE <= frame_max
    # When a retry copy adds our bookkeeping
    retry_headers = {**codec.clean_headers(sent.headers), codec.H_ATTEMPT: 1, codec.H_DELAY_MS: 3000,
                     codec.H_FIRST_MS: 1_733_650_000_000}
    copy = copies.fit(copies.properties(sent, retry_headers), frame_max)
    # Then it fits, the largest foreign header is gone and named, the rest and ours are kept
    assert copies.header_size(copy) <= frame_max
    assert big not in copy.headers and copy.headers[small] == "s" * 100
    assert copy.headers[codec.H_DROPPED] == big and copy.headers[codec.H_ATTEMPT] == 1


def test_the_frame_is_exact_on_the_wire():
    # The size fit() reckons with is the size pika's marshalled header frame really has
    props = original(headers={"a": "x" * 1000, "b": 7, "when": datetime.datetime(2026, 1, 1)}, message_id="m")
    frame = pika.frame.Header(1, 10, props)
    props.headers[codec.H_SEQ] = 2**40
    assert len(frame.marshal()) == copies.header_size(original(headers={"a": "x" * 1000, "b": 7,
                                                                        "when": datetime.datetime(2026, 1, 1)},
                                                               message_id="m"))


def test_on_a_tiny_frame_the_optional_properties_go_then_our_texts_are_cut():
    # Given a broker negotiating the smallest frame_max AMQP allows and a copy with long texts
    headers = {codec.H_KEY: "k" * 255, codec.H_ERROR: "e" * 2000, codec.H_REASON: "max-attempts",
               codec.H_DROPPED: "d" * 2000}
    props = original(message_id="m" * 255, correlation_id="c" * 255, reply_to="r" * 255, type="t" * 255,
                     app_id="a" * 255)
    copy = copies.fit(copies.properties(props, headers), 4096)
    # Then it fits, keeping the key and the reason whole
    assert copies.header_size(copy) <= 4096
    assert copy.headers[codec.H_KEY] == "k" * 255 and copy.headers[codec.H_REASON] == "max-attempts"
    assert "message_id" in copy.headers[codec.H_DROPPED_PROPS] or copy.message_id == "m" * 255


def test_a_copy_that_cannot_fit_at_all_is_refused():
    with pytest.raises(copies.FrameTooLarge):
        copies.fit(copies.properties(None, {codec.H_KEY: "k" * 255}), 200)
