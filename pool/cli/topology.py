"""``ctlpool topology C...``: declare (idempotently) and show controllers; ``ctlpool topology resize C
--partitions N``: grow or shrink one online (``pool.resize``).

Data flow: flags -> settings -> ``pool.topology.ensure`` then queue counts (show), or
``pool.resize.resize`` printing each step as it goes.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from ..errors import ConfigError
from ..settings import PoolSettings
from ..text import escape
from .common import TOPOLOGY_OPTS, settings_from, to_json


def cmd_topology(args: argparse.Namespace) -> int:
    words = list(args.words)
    action = words.pop(0) if words[0] in ("declare", "resize") and len(words) > 1 else "declare"
    settings = settings_from(args, TOPOLOGY_OPTS)
    if action == "resize":
        if len(words) != 1:
            raise ConfigError("topology resize: give one CONTROLLER")
        if args.partitions is None:
            raise ConfigError("topology resize: --partitions N is required (the count to move to)")
        return _resize(settings, words[0])
    return _declare(settings, words, args.json)


def _resize(settings: PoolSettings, controller: str) -> int:
    import time

    from ..amqp import ChannelGone
    from ..errors import CtlpoolError
    from ..resize import resize
    from ..worker.follow import TAKEOVER_S

    t0 = time.monotonic()

    def say(line: str) -> None:
        print(escape(f"[{time.monotonic() - t0:6.1f}s] {controller}: {line}"), flush=True)

    try:
        done = asyncio.run(resize(settings.broker, settings.topology, controller, settings.topology.partitions, say))
    except ChannelGone as exc:  # the broker went away mid-way: the layout on the broker says where it stopped
        raise CtlpoolError(f"the connection to the broker was lost during the resize ({exc}); run the same "
                           f"command again to finish it (or a member of the pool will, once its lock is free "
                           f"for {TAKEOVER_S:.0f}s)") from None
    say(f"done: {done.describe()}")
    return 0


def _declare(settings: PoolSettings, controllers: list[str], as_json: bool) -> int:
    from .. import topology
    from ..amqp import connect

    b, t = settings.broker, settings.topology

    async def show() -> list[dict[str, Any]]:
        live = await topology.ensure(b, t, controllers)
        conn = await connect(b.amqp_url, name="ctlpool-topology")
        try:
            out = []
            for c in controllers:
                names = topology.Names(b.prefix, c)
                p = live[c].partitions
                queues = [names.partition(i, p) for i in range(p)]
                queues += [names.tier(s) for s in t.tiers_s] + [names.parked]
                counts = await topology.counts(conn, queues)
                out.append({"controller": c, "exchange": names.exchange, "queue_type": t.queue_type,
                            "layout": {"partitions": p, "version": live[c].version, "text": live[c].describe()},
                            "queues": [{"name": q.name, "ready": q.ready, "consumers": q.consumers}
                                       for q in counts if q is not None]})
            return out
        finally:
            conn.close()

    result = asyncio.run(show())
    if as_json:
        print(to_json(result))
        return 0
    for c in result:
        print(f"{escape(c['exchange'])}  (x-consistent-hash, {c['layout']['text']}, {len(c['queues'])} queues, "
              f"{c['queue_type']})")
        for q in c["queues"]:
            print(f"  {escape(q['name']):<40} ready={q['ready']:<8} consumers={q['consumers']}")
    return 0
