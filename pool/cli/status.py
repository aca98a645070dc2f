"""``ctlpool status``: members, owners, queue depths, each controller's live layout (``pool.status``)."""

from __future__ import annotations

import argparse
import asyncio

from .common import STATUS_OPTS, settings_from, to_json


def cmd_status(args: argparse.Namespace) -> int:
    from ..status import collect, render

    settings = settings_from(args, STATUS_OPTS)
    snap = asyncio.run(collect(settings.broker, settings.topology, args.controller or None, args.listen_s,
                               replicas=True))
    print(to_json(snap) if args.json else render(snap))
    return 0


