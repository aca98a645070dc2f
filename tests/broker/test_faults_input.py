"""Hostile and malformed input against the real broker: what ``ctlpool`` prints stays one line per
thing and inert on a terminal, bad input is one line and exit code 2, and no password is printed.

The CLI runs as a subprocess, as an operator would run it; parked messages are written by hand
with the headers the worker writes, so their key, reason and error can be anything a publisher
could have put there.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from typing import Any

import pika
import pytest

from pool.settings import BrokerSettings, TopologySettings
from pool.text import escape
from tests.helpers import ROOT, queue_depth

pytestmark = pytest.mark.broker

PARTITIONS = 4
# A key that clears the screen, turns the text red, reverses what follows and forges a second line.
EVIL_KEY = "web\x1b[2J\x1b[31m\u202eexe.txt\nFORGED 1 permanent"
EVIL_ERROR = "boom\r\n\x9b31mline two\u2066\x07"


def cli(url: str, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    """``ctlpool ARGS`` as a process; bytes out, so that nothing is decoded away before we look."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("CTLPOOL_")},
           "CTLPOOL_AMQP_URL": url, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "pool.cli", *args], env=env, cwd=ROOT, capture_output=True,
                          timeout=60, input=stdin, stdin=None if stdin is not None else subprocess.DEVNULL)


def inert(data: bytes) -> list[str]:
    """The lines of ``data``; asserts that none holds a character a terminal would act on."""
    text = data.decode()
    lines = text.split("\n")
    for line in lines:
        assert escape(line) == line, line
    return [line for line in lines if line]


def ensure_topology(url: str, prefix: str) -> None:
    from pool import topology

    asyncio.run(topology.ensure(BrokerSettings(amqp_url=url, prefix=prefix), TopologySettings(partitions=PARTITIONS),
                                ["rec"]))


def park_by_hand(url: str, prefix: str, key: str, reason: str, error: str, body: bytes) -> None:
    """A parked message as the worker writes one, carrying whatever text a publisher chose."""
    headers: dict[str, Any] = {"x-ctlpool-key": key, "x-ctlpool-reason": reason, "x-ctlpool-error": error,
                               "x-ctlpool-parked-ms": int(time.time() * 1000),
                               "x-ctlpool-parked-from": f"{prefix}.rec.p001\x1b]0;title\x07"}
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        ch.basic_publish("", f"{prefix}.rec.parked", body, pika.BasicProperties(delivery_mode=2, headers=headers),
                         mandatory=True)
    finally:
        conn.close()


@pytest.mark.timeout(90)
def test_parked_list_and_show_print_hostile_text_escaped(amqp_url, prefix):
    # Given a parked event whose key, reason, error, origin and body carry ESC sequences, C1 controls,
    # bidi overrides and newlines
    ensure_topology(amqp_url, prefix)
    park_by_hand(amqp_url, prefix, EVIL_KEY, "permanent\u202e", EVIL_ERROR, '{"x": "\x1b[5m\u2067"}'.encode())
    # When it is listed
    r = cli(amqp_url, "parked", "list", "rec", "--prefix", prefix)
    # Then every line is inert, the event takes one row, and its key and error read escaped
    assert r.returncode == 0, r.stderr
    lines = inert(r.stdout)
    assert len(lines) == 3, lines  # summary, column header, one row
    assert "web\\x1b[2J\\x1b[31m\\u202eexe.txt\\nFORGED 1 permanent" in lines[2]
    assert "permanent\\u202e" in lines[2] and "boom" in lines[2]
    # When it is shown in full
    r = cli(amqp_url, "parked", "show", "rec", "--prefix", prefix)
    # Then the same holds for the error, the headers and the body: four lines for one event
    assert r.returncode == 0, r.stderr
    lines = inert(r.stdout)
    assert len(lines) == 4, lines
    assert lines[1] == "  error: boom\\r\\n\\x9b31mline two\\u2066\\x07"
    assert "\\u202e" in lines[2] and "\\u2067" in lines[3]
    # When listed and shown as JSON
    for action in ("list", "show"):
        r = cli(amqp_url, "parked", action, "rec", "--prefix", prefix, "--json")
        # Then the JSON is inert on a terminal and still decodes to the exact text
        assert r.returncode == 0, r.stderr
        inert(r.stdout)
        [item] = json.loads(r.stdout)
        assert (item["key"], item["reason"], item["error"]) == (EVIL_KEY, "permanent\u202e", EVIL_ERROR)
    # and nothing was taken out of the parking queue by looking
    assert queue_depth(amqp_url, f"{prefix}.rec.parked") == 1


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("stdin", "needle"),
    [
        (b"good\t{}\n\xff\xfekey\t{}\n", "stdin line 2: KEY is not UTF-8"),
        (b"k" * 256 + b"\t{}\n", "stdin line 1: KEY: 256 bytes in UTF-8; AMQP allows at most 255"),
    ],
)
def test_publish_batch_with_a_key_amqp_cannot_carry_is_one_line(amqp_url, prefix, stdin: bytes, needle: str):
    # Given a controller's topology, and batch input whose key is not UTF-8 or is over 255 bytes
    ensure_topology(amqp_url, prefix)
    # When ctlpool publish --batch reads it
    r = cli(amqp_url, "publish", "rec", "--batch", "--prefix", prefix, stdin=stdin)
    # Then it stops with exit 2 and one line naming the stdin line, no traceback
    err = r.stderr.decode()
    assert r.returncode == 2, err
    assert "Traceback" not in err
    assert err.splitlines() == [f"ctlpool: error: {needle}"]


@pytest.mark.timeout(60)
def test_publish_batch_stopped_by_a_bad_line_confirms_every_line_before_it(amqp_url, prefix):
    # Given a controller's topology, and 3,000 good lines before a bad one (more than one
    # window: confirms are still in flight when the bad line is read)
    ensure_topology(amqp_url, prefix)
    good = 3000
    stdin = b"".join(b"k%d\t{}\n" % i for i in range(good)) + b"\t{}\n"
    # When ctlpool publish --batch reads it
    r = cli(amqp_url, "publish", "rec", "--batch", "--prefix", prefix, stdin=stdin)
    # Then it stops with exit 2 and one line (no unretrieved confirm noise from the closed connection)...
    assert r.returncode == 2, r.stderr.decode()
    assert r.stderr.decode().splitlines() == [f"ctlpool: error: stdin line {good + 1}: empty KEY"]
    # ...and only after the broker confirmed every line before the bad one
    assert sum(queue_depth(amqp_url, f"{prefix}.rec.p{i:03d}") for i in range(PARTITIONS)) == good


@pytest.mark.timeout(60)
def test_doctor_on_a_list_of_urls_prints_no_password(amqp_url):
    # Given a node list: the real broker, then the same broker with a wrong password
    scheme, _, rest = amqp_url.partition("://")
    _, _, hostpart = rest.rpartition("@")
    nodes = f"{amqp_url},{scheme}://guest:hunter2@{hostpart}"
    # When ctlpool doctor checks them
    r = cli(nodes, "doctor")
    out = (r.stdout + r.stderr).decode()
    # Then it checks each node on its own lines: the first is fine, the second is not, and the
    # password of neither is printed
    assert r.returncode == 69, out
    assert "hunter2" not in out
    assert f"broker: reachable at {scheme}://guest:***@{hostpart}" in out
    assert "plugin: rabbitmq_consistent_hash_exchange enabled" in out
    assert f"not reachable at {scheme}://guest:***@{hostpart}" in out
