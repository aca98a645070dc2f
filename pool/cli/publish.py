"""``ctlpool publish``: one event, or a batch of ``KEY<TAB>JSON`` lines from stdin, pipelined and confirmed.

Data flow: flags -> ``BrokerSettings`` -> ``pool.publisher.Publisher`` (the controller's
exchange checked first: a publish to a missing one would close the channel).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

import orjson

from ..codec import MAX_SHORTSTR
from ..errors import ConfigError
from ..text import escape
from .common import BROKER_OPTS, PUBLISH_RETRY_S, settings_from


def _parseto_json(text: str, what: str) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise ConfigError(f"{what}: not valid JSON ({exc})") from None


def cmd_publish(args: argparse.Namespace) -> int:
    from ..publisher import Publisher

    settings = settings_from(args, BROKER_OPTS)
    b = settings.broker
    _check_shortstr(f"{b.prefix}.{args.controller}", "CONTROLLER (with --prefix, the exchange name)")
    if args.batch:
        if args.key is not None:
            raise ConfigError("--batch: reads KEY<TAB>JSON lines from stdin; give no KEY argument")

        def lines() -> Any:
            for n, line in enumerate(sys.stdin.buffer, 1):
                line = line.rstrip(b"\r\n")
                if not line:
                    continue
                key, sep, body = line.partition(b"\t")
                if not key:
                    raise ConfigError(f"stdin line {n}: empty KEY")
                try:
                    text_key = key.decode()
                except UnicodeDecodeError:
                    raise ConfigError(f"stdin line {n}: KEY is not UTF-8") from None
                _check_shortstr(text_key, f"stdin line {n}: KEY")
                body = body or b"{}"
                try:
                    orjson.loads(body)
                except orjson.JSONDecodeError as exc:
                    raise ConfigError(f"stdin line {n}: JSON after the tab is invalid ({exc})") from None
                yield args.controller, text_key, body

        async def batch() -> int:
            async with Publisher(b.amqp_url, prefix=b.prefix) as pub:
                await _check_controller(pub, args.controller)
                # a node lost mid-batch: reconnect (the next node of a list first), re-send what wasn't confirmed
                return await pub.publish_many(lines(), raw=True, retry_s=PUBLISH_RETRY_S)

        n = asyncio.run(batch())
        print(f"published {n} events to {b.prefix}.{args.controller}")
        return 0
    if args.key is None:
        raise ConfigError("publish: KEY is required (or --batch)")
    _check_shortstr(args.key, "KEY")
    payload = _parseto_json(args.payload, "JSON argument") if args.payload is not None else {}

    async def one() -> None:
        async with Publisher(b.amqp_url, prefix=b.prefix) as pub:
            await _check_controller(pub, args.controller)
            await pub.publish(args.controller, args.key, payload)

    asyncio.run(one())
    print(escape(f"published {args.key} to {b.prefix}.{args.controller}"))
    return 0


def _check_shortstr(text: str, what: str) -> None:
    """Routing keys and exchange names are AMQP short strings: UTF-8, 255 bytes at most."""
    try:
        size = len(text.encode())
    except UnicodeEncodeError:  # undecodable bytes on the command line
        raise ConfigError(f"{what}: not valid UTF-8") from None
    if size > MAX_SHORTSTR:
        raise ConfigError(f"{what}: {size} bytes in UTF-8; AMQP allows at most {MAX_SHORTSTR}")


async def _check_controller(pub: Any, controller: str) -> None:
    """A publish to a missing exchange closes the channel with 404; say it plainly instead."""
    if not await pub._conn.exists("exchange", f"{pub.prefix}.{controller}"):
        raise ConfigError(f"controller {controller!r}: exchange {pub.prefix}.{controller} does not exist; "
                          f"start the pool or run 'ctlpool topology {controller}' first")


