"""``ctlpool status``: who is a member, who owns each partition, what is queued.

Data flow: bind a private queue to ``ctl.members``, listen for a few heartbeat intervals
(every live worker announces itself, with the partitions it consumes and their unacked
counts), then read each partition's ready count with a passive declare, and (quorum queues)
where it is led and how many replicas are online from ``pool.replicas``. Owners are what
the members themselves report, not a prediction, so a handover in progress shows up as
it is (a partition with no owner for a moment, or one listed twice while the broker's
single-consumer lock decides). Anyone who may publish to ``ctl.members`` writes the names
``render`` shows, so they go through ``pool.text.escape``.

Meanwhile a second connection publishes one message nobody receives (default exchange, no
such queue): during a memory or disk alarm the broker blocks exactly the connections that
publish, and says so (``connection.blocked``), which is how status tells an alarm. That
connection is then dropped, not closed: a blocked connection's close is never read.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgspec

from . import layout as layouts
from . import membership, topology
from .amqp import connect
from .replicas import Replicas, Unavailable, leaders_per_node, under_replicated
from .replicas import read as read_replicas
from .settings import BrokerSettings, TopologySettings, redact_url
from .text import escape

DEFAULT_LISTEN_S = 2.5  # a little over two default heartbeat intervals
STALLED_S = 60.0  # a member whose oldest delivery waits this long for its ack is flagged (the alert rule's threshold)


ALARM_PROBE_KEY = "ctlpool.status.alarm-probe"  # no queue has this name: the probe message is dropped


async def _alarm_probe(broker: BrokerSettings) -> Any:
    """A connection that has just published, so the broker tells it of an alarm (see the docstring)."""
    probe = await connect(broker.amqp_url, name="ctlpool-status alarm probe", heartbeat_s=broker.heartbeat_s)
    ch = await probe.channel()
    ch.raw.basic_publish("", ALARM_PROBE_KEY, b"")
    return probe


async def collect(broker: BrokerSettings, topo: TopologySettings, controllers: list[str] | None = None,
                  listen_s: float = DEFAULT_LISTEN_S, replicas: bool = False) -> dict[str, Any]:
    """Snapshot of members and partitions as a JSON-ready dict; ``replicas``: with each quorum
    partition's leader and replicas online (a ``rabbitmqctl`` run: an Erlang VM start, ~1 s of CPU)."""
    conn = await connect(broker.amqp_url, name="ctlpool-status", heartbeat_s=broker.heartbeat_s)
    try:
        table = membership.MemberTable(timeout_s=listen_s * 10, clock=time.monotonic)
        heard: dict[str, float] = {}
        ch = await conn.channel()
        ok = await ch.rpc("queue_declare", queue="", exclusive=True, auto_delete=True)
        await ch.rpc("queue_bind", queue=ok.method.queue, exchange=topology.members_exchange(broker.prefix))

        def on_hb(_c: Any, _m: Any, _p: Any, body: bytes) -> None:
            hb = membership.decode(body)
            if hb is not None:
                table.observe(hb)
                heard[hb.id] = time.time()

        await ch.consume(ok.method.queue, on_hb, auto_ack=True)
        probe = await _alarm_probe(broker)
        await asyncio.sleep(listen_s)
        blocked = probe.blocked
        probe.abort()
        await ch.close()
        members = table.live()
        names = controllers or sorted({c for hb in members for c in hb.controllers})
        groups, replicas_error = await _replicas(broker, topo) if replicas else ({}, None)
        out_ctls = []
        for name in names:
            nm = topology.Names(broker.prefix, name)
            live = await layouts.read(conn, nm)  # the broker's count, not a flag's
            p = live.partitions if live is not None else topo.partitions
            queues = [nm.partition(i, p) for i in range(p)]
            counts = await topology.counts(conn, queues + [nm.parked])
            owners: dict[int, list[tuple[str, int]]] = {}
            for hb in members:
                for p, unacked in hb.parts.get(name, {}).items():
                    owners.setdefault(int(p), []).append((hb.id, unacked))
            parts = []
            for i, q in enumerate(counts[:-1]):
                own = owners.get(i, [])
                r = groups.get(queues[i])
                parts.append({"partition": i, "queue": queues[i], "exists": q is not None,
                              "owner": [o for o, _ in own], "ready": q.ready if q else None,
                              "unacked": sum(u for _, u in own), "consumers": q.consumers if q else None,
                              "leader": r.leader if r else None,
                              "replicas": len(r.members) if r else None,
                              "replicas_online": len(r.online) if r else None})
            parked = counts[-1]
            running = [hb for hb in members if name in hb.controllers]
            out_ctls.append({"controller": name, "partitions": parts,
                             "layout": _layout(live, p, len(running)),
                             "parked": parked.ready if parked else None,
                             "leaders_per_node": leaders_per_node(groups, queues),
                             "under_replicated": under_replicated(groups, f"{broker.prefix}.{name}")})
        return {
            "broker": redact_url(broker.amqp_url),
            "replicas_error": replicas_error,
            "broker_blocked": blocked,
            "members": [{"id": hb.id, "node": hb.node, "worker": hb.worker, "weight": hb.weight, "pid": hb.pid,
                         "controllers": list(hb.controllers), "broker_blocked": hb.blocked,
                         "broker_node": hb.broker,
                         "partitions": {c: len(v) for c, v in hb.parts.items()},
                         "oldest_unacked_s": hb.oldest_unacked_s, "layouts": hb.layouts, "paused": list(hb.paused),
                         "last_heartbeat_s_ago": round(time.time() - heard[hb.id], 2)} for hb in members],
            "controllers": out_ctls,
        }
    finally:
        conn.close()


def _layout(live: layouts.Layout | None, partitions: int, members: int) -> dict[str, Any]:
    """The live layout, and what a fleet larger than it leaves idle."""
    out: dict[str, Any] = {"partitions": partitions, "version": live.version if live else None,
                           "resizes": live.resizes if live else 0,
                           "text": live.describe() if live else f"{partitions} partitions (no layout on the broker yet)",
                           "resize": msgspec.to_builtins(live.resize) if live and live.resize else None,
                           "idle_members": max(0, members - partitions)}
    return out


async def _replicas(broker: BrokerSettings, topo: TopologySettings) -> tuple[dict[str, Replicas], str | None]:
    """Leaders and online replicas of the quorum queues (``pool.replicas``), or why they can't be shown."""
    if topo.queue_type != "quorum":
        return {}, None
    try:
        return await asyncio.to_thread(read_replicas, broker.admin_node, broker.amqp_url), None
    except Unavailable as exc:
        return {}, str(exc)


def render(snapshot: dict[str, Any]) -> str:
    """Human-readable form of ``collect``'s result."""
    lines = [f"broker {escape(snapshot['broker'])}"]
    if snapshot.get("broker_blocked"):
        lines.append(f"BROKER BLOCKS PUBLISHING: {escape(snapshot['broker_blocked'])} (memory or disk alarm): "
                     "events and retries wait; members' heartbeats can't reach each other, so each may "
                     "subscribe to the others' partitions (as a standby) until it ends")
    lines += ["", f"members ({len(snapshot['members'])}):"]
    by_node: dict[str, list[dict[str, Any]]] = {}
    for m in snapshot["members"]:
        by_node.setdefault(m["node"], []).append(m)
    for node, ms in sorted(by_node.items()):
        lines.append(f"  {escape(node)}  workers={len(ms)} weight={ms[0]['weight']:g}")
        for m in ms:
            owned = escape(", ".join(f"{c}:{n}" for c, n in sorted(m["partitions"].items())) or "-")
            lines.append(f"    {escape(m['id']):<24} pid={m['pid']:<7} partitions {owned:<20} "
                         f"via {escape(m.get('broker_node') or '?'):<16} last heartbeat {m['last_heartbeat_s_ago']:.1f}s ago"
                         + (f"  BROKER BLOCKS ITS PUBLISHING: {escape(m['broker_blocked'])}"
                            if m.get("broker_blocked") else "")
                         + (f"  oldest unacked {m['oldest_unacked_s']:.0f}s"
                            + (" (STALLED? nothing acked for a minute)" if m["oldest_unacked_s"] >= STALLED_S else "")
                            if m.get("oldest_unacked_s") else "")
                         + (f"  PAUSED by a resize: {escape(', '.join(m['paused']))}" if m.get("paused") else ""))
    for c in snapshot["controllers"]:
        parts = c["partitions"]
        ready = sum(p["ready"] or 0 for p in parts)
        unacked = sum(p["unacked"] for p in parts)
        lay = c.get("layout") or {"text": f"{len(parts)} partitions", "idle_members": 0, "partitions": len(parts)}
        lines += ["", f"controller {escape(c['controller'])}: {escape(lay['text'])}; ready {ready}, "
                      f"unacked {unacked}, parked {c['parked']}"]
        if lay["idle_members"]:
            lines.append(f"  {lay['idle_members']} members have no partition of it: to use them, ctlpool topology "
                         f"resize {escape(c['controller'])} --partitions {lay['partitions'] + lay['idle_members']}")
        if c.get("leaders_per_node"):
            lines.append("  partition leaders per node: "
                         + ", ".join(f"{escape(n)} {k}" for n, k in c["leaders_per_node"].items()))
        if c.get("under_replicated"):
            lines.append(f"  UNDER-REPLICATED ({len(c['under_replicated'])} queues, replicas online/members): "
                         + escape(", ".join(c["under_replicated"][:8])) + (" ..." if len(c["under_replicated"]) > 8 else ""))
        for p in parts:
            owner = escape(",".join(p["owner"])) or ("(missing queue)" if not p["exists"] else "(none)")
            where = (f"  leader {escape(p['leader'])} replicas {p['replicas_online']}/{p['replicas']}"
                     if p.get("leader") else "")
            lines.append(f"  p{p['partition']:03d}  owner {owner:<24} ready {p['ready']!s:<8} unacked {p['unacked']}"
                         + where)
    if snapshot.get("replicas_error"):
        lines += ["", f"partition leaders and replicas: not shown: {escape(snapshot['replicas_error'])}"]
    return "\n".join(lines)
