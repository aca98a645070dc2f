"""Broker URLs: a single ``amqp://`` / ``amqps://`` URL or a comma-separated list of a cluster's nodes.

Data flow: ``parse_urls`` validates what a flag, the environment, ``--amqp-url-file`` or the
TOML file gave (``pool.settings`` calls it) and returns the list normalised; everything that
prints a URL goes through ``redact_url``; ``split_urls`` gives the nodes back to whoever connects.
"""

from __future__ import annotations

import logging
import os
import random
import re
from typing import Any
from urllib.parse import unquote, urlsplit

from .text import escape

log = logging.getLogger("ctlpool.settings")

# A comma that starts another URL of a list (``amqp://a,amqp://b``); a comma in a password does not.
_NEXT_URL = re.compile(r",(?=\s*[A-Za-z][A-Za-z0-9+.-]*://)")


def split_urls(text: str) -> list[str]:
    """The URLs of a comma-separated list (a cluster's nodes), or ``[text]`` when it is one URL."""
    return _NEXT_URL.split(text)


def redact_url(url: str) -> str:
    """The URL (or each URL of a list) with its password replaced by ``***``.

    The user part ends at the *last* ``@``: a password holding an unencoded ``/``, ``?``, ``#`` or
    ``@`` fools ``urlsplit``, not this (an ``@`` in the vhost hides a little too much instead).
    """
    return ",".join(_redact_one(u) for u in split_urls(url))


def _redact_one(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    userinfo, at, host = rest.rpartition("@")
    user, colon, _ = userinfo.partition(":")
    return f"{scheme}{sep}{user}:***@{host}" if at and colon else url


def parse_urls(v: Any) -> str:
    """One broker URL, or a comma-separated list of them; each must parse one way only."""
    urls = [u.strip() for u in split_urls(str(v).strip())]
    for u in urls:
        check_url(u)
    vhosts = {vhost(u) for u in urls}
    if len(vhosts) > 1:
        raise ValueError(f"the nodes of one cluster share one vhost; got {', '.join(sorted(map(repr, vhosts)))}")
    return ",".join(urls)


def vhost(url: str) -> str:
    """The vhost a URL names, as pika reads it (no path: the default ``/``)."""
    path = urlsplit(url).path
    return unquote(path[1:]) if len(path) > 1 else "/"


def check_url(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("amqp", "amqps") or not parts.hostname:
        raise ValueError("expected amqp://user:pass@host:port/vhost or amqps://…")
    rest = url.partition("://")[2]
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    if "@" in rest[len(authority):]:
        # urlsplit ends the user part at the first / ? #, redact_url at the last @: say it plainly
        raise ValueError("the user or password holds a '/', '?' or '#' (or the vhost an '@'); "
                         "percent-encode them: %2F %3F %23 %40")
    try:
        parts.port
    except ValueError:
        raise ValueError("the port is not a number from 0 to 65535") from None


def read_url_file(v: Any) -> str:
    """The URL in the file; a file others may read gets a warning (it holds the password), not a refusal."""
    path = str(v)
    try:
        with open(path, encoding="utf-8") as fh:
            mode = os.fstat(fh.fileno()).st_mode
            text = fh.read()
    except OSError as exc:
        raise ValueError(f"cannot read it: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ValueError("it is not UTF-8 text") from None
    if mode & 0o077:
        log.warning("--amqp-url-file: %s can be read by group or others (mode %03o) and holds the broker "
                    "password; restrict it: chmod 600 %s", escape(path), mode & 0o777, escape(path))
    return parse_urls(text)


class Nodes:
    """One process's view of a cluster's URL list: shuffled once (so a host's processes spread
    over the nodes), tried from a cursor that stays on the node that works and moves on past one
    that refused or dropped us. Pure, but for the ``rand`` it is given."""

    def __init__(self, urls: list[str], rand: random.Random) -> None:
        self.urls = list(urls)
        rand.shuffle(self.urls)
        self._cursor = 0

    def order(self) -> list[str]:
        """Every URL, starting with the one to try first."""
        c = self._cursor
        return self.urls[c:] + self.urls[:c]

    def worked(self, url: str) -> None:
        self._cursor = self.urls.index(url)

    def failed(self, url: str) -> None:
        """``url`` refused a connection or dropped one: start from the next node from now on."""
        i = self.urls.index(url)
        if i == self._cursor:
            self._cursor = (i + 1) % len(self.urls)


_nodes: dict[tuple[int, str], Nodes] = {}


def nodes_for(text: str) -> Nodes:
    """The ``Nodes`` of this URL list for this process (a forked worker shuffles its own)."""
    key = (os.getpid(), text)
    nodes = _nodes.get(key)
    if nodes is None:
        nodes = _nodes[key] = Nodes([u.strip() for u in split_urls(text)], random.Random(os.urandom(8)))
    return nodes
