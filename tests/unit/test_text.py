"""Unit tests of pool.text (hostile text made printable) and of its use in ``ctlpool status``'s rendering."""

from __future__ import annotations

import json

import orjson
import pytest

from pool.status import render
from pool.text import escape, json_safe

# Every character class the helper must neutralise, with how it must read afterwards.
HOSTILE = [
    ("\x1b[2J", "\\x1b[2J"),  # ESC sequence: clears the screen
    ("\x00", "\\x00"),
    ("\x07", "\\x07"),  # BEL
    ("a\nb", "a\\nb"),  # a forged second line
    ("a\rb", "a\\rb"),
    ("a\tb", "a\\tb"),
    ("\x7f", "\\x7f"),  # DEL
    ("\x85", "\\x85"),  # C1 NEL: a newline to some terminals
    ("\x9b31m", "\\x9b31m"),  # C1 CSI: an ESC sequence in one byte
    ("\u202e", "\\u202e"),  # right-to-left override
    ("\u202a\u202b\u202c\u202d", "\\u202a\\u202b\\u202c\\u202d"),  # embeddings, pop
    ("\u2066\u2067\u2068\u2069", "\\u2066\\u2067\\u2068\\u2069"),  # isolates
    ("\u200e\u200f", "\\u200e\\u200f"),  # LRM, RLM
    ("\u061c", "\\u061c"),  # Arabic letter mark
    ("\u2028\u2029", "\\u2028\\u2029"),  # line and paragraph separators
]


@pytest.mark.parametrize(("raw", "shown"), HOSTILE)
def test_escape_makes_control_and_bidi_characters_visible(raw: str, shown: str) -> None:
    # Given text holding a control or bidi character
    # When escaped
    out = escape(raw)
    # Then it reads as a visible escape, on one line, with nothing left a terminal would act on
    assert out == shown
    assert out.isprintable()


@pytest.mark.parametrize("text", ["deployments/web-1", "ключ", "键", "naïve café", "emoji 🚀", "back\\slash", ""])
def test_escape_leaves_ordinary_text_alone(text: str) -> None:
    # Given ordinary text, any script, and a backslash
    # When escaped
    # Then it is unchanged (a repr already escaped once reads the same)
    assert escape(text) == text


def test_escape_takes_any_object() -> None:
    # Given a value that is not a string (a missing key, an exception)
    # When escaped
    # Then its str() is used
    assert escape(None) == "None"
    assert escape(ValueError("bad\nthing")) == "bad\\nthing"


def test_json_safe_is_the_same_json_without_raw_bidi_or_c1() -> None:
    # Given indented JSON of hostile strings
    value = {"key": "a\u202eb\x9b\x7f", "error": "x\x1b[31my\nz", "n": [1, 2]}
    encoded = orjson.dumps(value, option=orjson.OPT_INDENT_2).decode()
    # When made safe
    out = json_safe(encoded)
    # Then it decodes to the same value, keeps its indentation, and holds no character escape() would change
    assert json.loads(out) == value
    assert out.count("\n") == encoded.count("\n")
    assert all(escape(line) == line for line in out.splitlines())


def test_status_render_escapes_what_members_announce() -> None:
    # Given a status snapshot whose member, node and controller names came from hostile heartbeats
    evil = "x\x1b[2J\u202eexe.txt\nforged"
    snap = {
        "broker": "amqp://u:***@h/",
        "members": [{"id": evil, "node": evil, "worker": 0, "weight": 1.0, "pid": 1, "controllers": [evil],
                     "partitions": {evil: 1}, "last_heartbeat_s_ago": 0.1}],
        "controllers": [{"controller": evil, "parked": 0,
                         "partitions": [{"partition": 0, "queue": "q", "exists": True, "owner": [evil],
                                         "ready": 0, "unacked": 0, "consumers": 1}]}],
    }
    # When rendered for a terminal
    out = render(snap)
    # Then no raw control or bidi character is left, each line is one line, and the names read escaped
    assert all(escape(line) == line for line in out.split("\n"))
    assert not any(line.lstrip().startswith("forged") for line in out.split("\n"))
    assert "x\\x1b[2J\\u202eexe.txt\\nforged" in out


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_log_lines_escape_what_came_from_outside(fmt: str) -> None:
    import logging

    from pool.logs import JsonFormatter, TextFormatter

    # Given a log record whose message and key carry a newline, a C1 CSI and a bidi override
    record = logging.LogRecord("ctlpool.worker", logging.WARNING, __file__, 1, "parking event: %s", ("bad\u202eexe",),
                               None)
    record.key = "k\x9b2J\nforged"
    # When it is formatted
    line = (JsonFormatter() if fmt == "json" else TextFormatter()).format(record)
    # Then it is one line with none of those characters raw
    assert "\n" not in line and "\u202e" not in line and "\x9b" not in line
    assert "u202e" in line and ("\\x9b" in line or "\\u009b" in line)
    if fmt == "json":
        import json

        assert json.loads(line)["key"] == "k\x9b2J\nforged"  # the same JSON: a reader decodes the key as sent
