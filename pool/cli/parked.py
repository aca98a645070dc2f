"""``ctlpool parked list|show|replay|purge``: a controller's parked events (``pool.parked``).

Data flow: flags -> a ``parked.Selection`` -> ``pool.parked.run`` on one connection -> printed
through ``pool.text`` (keys, reasons and errors are anyone's text).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

import orjson

from ..exits import EXIT_CONFIG
from ..text import escape
from .common import BROKER_OPTS, ask, fail, settings_from, to_json


def cmd_parked(args: argparse.Namespace) -> int:
    from .. import parked
    from ..amqp import connect

    settings = settings_from(args, BROKER_OPTS)
    b = settings.broker
    selection = parked.Selection(key=args.key, reason=args.reason, limit=args.limit)
    if args.action == "purge" and not args.yes and not sys.stdin.isatty():
        return fail(EXIT_CONFIG, "parked purge: no terminal to confirm on; add --yes to purge without asking")

    async def confirm(items: list[parked.Parked]) -> bool:
        question = escape(f"purge {len(items)} parked event(s) of {args.controller} ({selection.describe()}) "
                          f"from {b.prefix}.{args.controller}.parked? [y/N] ")
        answer = await asyncio.get_running_loop().run_in_executor(None, ask, question)
        return answer.strip().lower() in ("y", "yes")

    async def go() -> parked.Outcome:
        conn = await connect(b.amqp_url, name=f"ctlpool-parked {args.action}", heartbeat_s=b.heartbeat_s)
        try:
            return await parked.run(conn, b.prefix, args.controller, args.action, selection,
                                    confirm=None if args.yes else confirm)
        finally:
            conn.close()

    out = asyncio.run(go())
    return _print_parked(args, out)


def _print_parked(args: argparse.Namespace, out: Any) -> int:
    from ..parked import iso_time

    failed = out.failed or []
    if args.json:
        if args.action in ("list", "show"):
            print(to_json([p.as_dict(body=args.action == "show") for p in out.matched]))
        else:
            print(to_json({"queue": out.queue, "matched": len(out.matched), args.action + "d": out.done,
                         "declined": out.declined,
                         "failed": [{"position": p.position, "key": p.key, "error": e} for p, e in failed]}))
    elif args.action == "list":
        print(f"{escape(out.queue)}: {out.ready} parked, {len(out.matched)} selected")
        if out.matched:
            print(f"{'#':>5}  {'KEY':<24} {'REASON':<20} {'ATTEMPT':>7}  {'PARKED (UTC)':<24} {'SIZE':>7}  ERROR")
        for p in out.matched:
            first_line = p.error.splitlines()[0][:100] if p.error else ""
            print(f"{p.position:>5}  {escape(p.key):<24} {escape(p.reason):<20} {p.attempt:>7}  "
                  f"{iso_time(p.parked_at) or '-':<24} {p.size:>7}  {escape(first_line)}")
    elif args.action == "show":
        for p in out.matched:
            print(escape(f"#{p.position} key={p.key} reason={p.reason} attempt={p.attempt} "
                         f"parked={iso_time(p.parked_at) or '-'} from={p.parked_from or '-'} size={p.size}"))
            print(f"  error: {escape(p.error)}")
            d = p.as_dict(body=True)
            print(f"  headers: {escape(orjson.dumps(d['headers']).decode())}")
            print(f"  body: {escape(d['body']) if 'body' in d else 'hex:' + d['body_hex']}")
        if not out.matched:
            print(f"{escape(out.queue)}: nothing selected ({out.ready} parked)")
    elif out.declined:
        print("purge: nothing removed")
    elif args.action == "replay":
        print(escape(f"replayed {out.done} of {len(out.matched)} selected parked event(s) through "
                     f"{out.queue.rsplit('.', 1)[0]}"))
        for p, err in failed:
            print(escape(f"  not replayed: #{p.position} key={p.key}: {err}"), file=sys.stderr)
    else:
        print(escape(f"purged {out.done} parked event(s) from {out.queue}"))
    return 1 if failed else 0


