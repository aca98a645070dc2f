"""The ``ctlpool`` command: argument parsing only; the work lives in the modules it calls.

    ctlpool run        supervisor + workers            (pool.supervisor)
    ctlpool publish    send events, one or a batch     (pool.publisher)
    ctlpool topology   declare and show a controller   (pool.topology)
    ctlpool status     members, owners, queue depths   (pool.status)
    ctlpool doctor     broker and plugin there?        (pool.doctor)
    ctlpool parked     list/show/replay/purge parked   (pool.parked)
    ctlpool demo       the example controllers, live   (controllers.demo)

Flags are generated from ``pool.settings.OPTIONS``; each also reads ``CTLPOOL_<NAME>``
and a key in ``--config FILE.toml``. Any invalid input ends in one line on stderr and
exit code 2; an unreachable broker or missing plugin in one line and exit code 69.
Text that came from outside (keys, park reasons, errors, member names) is printed through
``pool.text`` so that control and bidi characters show as escapes.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from importlib.metadata import PackageNotFoundError, version
from typing import Any, NoReturn, Sequence

import orjson

from .codec import MAX_SHORTSTR
from .errors import BrokerUnavailable, ConfigError, CtlpoolError, PluginMissing, PublishError, TopologyMismatch
from .notify import Notifier
from .settings import OPTIONS, PoolSettings, load_toml, resolve, seconds
from .exits import EXIT_CONFIG, EXIT_TOPOLOGY, EXIT_UNAVAILABLE
from .text import escape, json_safe

log = logging.getLogger("ctlpool.cli")

BROKER_OPTS = frozenset({"amqp-url", "amqp-url-file", "tls-ca-file", "tls-cert-file", "tls-key-file", "prefix",
                         "heartbeat-s", "log-format", "log-level"})
TOPOLOGY_OPTS = BROKER_OPTS | {"partitions", "queue-type", "tiers-s", "queue-replicas"}
STATUS_OPTS = TOPOLOGY_OPTS | {"admin-node"}
DOCTOR_OPTS = BROKER_OPTS | {"admin-node"}
RUN_OPTS = frozenset(o.name for o in OPTIONS) - {"admin-node"}
PARKED_ACTIONS = ("list", "show", "replay", "purge")
START_BROKER_HINT = "start it with: rabbitmq-server -detached  (or: systemctl start rabbitmq-server)"
PUBLISH_RETRY_S = 60.0  # publish --batch: how long it keeps re-sending with no confirm from the broker


def _version() -> str:
    try:
        return version("ctlpool")
    except PackageNotFoundError:  # running from a source tree
        return "0+unknown"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_CONFIG, f"{self.prog}: error: {escape(message)}\n")


def _arg(parse: Any) -> Any:
    """An argparse ``type`` from a settings parser: its reason, and the value, in argparse's one line."""
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{exc}, got {text!r}") from None
    return convert


def _add_options(p: argparse.ArgumentParser, names: frozenset[str]) -> None:
    for opt in OPTIONS:
        if opt.name in names:
            p.add_argument(f"--{opt.name}", dest=opt.name, default=None, metavar=opt.metavar, help=opt.help)
    if "pin" in names:
        p.add_argument("--no-pin", dest="pin", action="store_const", const="false", help="do not pin workers to CPUs")
    p.add_argument("--config", metavar="FILE.toml", help="TOML file with settings (flags and CTLPOOL_* win over it)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ctlpool", description="Kubernetes-style controllers on RabbitMQ, one key at a time.")
    parser.add_argument("--version", action="version", version=f"ctlpool {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    run = sub.add_parser("run", help="run the supervisor and its workers")
    _add_options(run, RUN_OPTS)

    pub = sub.add_parser("publish", help="send an event (or --batch of them from stdin)")
    pub.add_argument("controller")
    pub.add_argument("key", nargs="?")
    pub.add_argument("payload", nargs="?", metavar="JSON", help="event body (default {})")
    pub.add_argument("--batch", action="store_true", help="read KEY<TAB>JSON lines from stdin, pipelined")
    _add_options(pub, BROKER_OPTS)

    topo = sub.add_parser("topology", help="declare (idempotently) and show a controller's queues")
    topo.add_argument("controller", nargs="+")
    topo.add_argument("--json", action="store_true", help="print JSON")
    _add_options(topo, TOPOLOGY_OPTS)

    st = sub.add_parser("status", help="members, partition owners, queued and parked counts")
    st.add_argument("controller", nargs="*", help="controllers to show (default: all the members run)")
    st.add_argument("--json", action="store_true", help="print JSON")
    st.add_argument("--listen-s", type=_arg(seconds()), default=2.5, metavar="S",
                    help="how long to listen for heartbeats (default 2.5)")
    _add_options(st, STATUS_OPTS)

    doc = sub.add_parser("doctor", help="check the broker and the consistent-hash plugin (--fix: start/enable locally)")
    doc.add_argument("--fix", action="store_true", help="start a local broker that is installed but stopped; enable the plugin")
    _add_options(doc, DOCTOR_OPTS)

    park = sub.add_parser("parked", help="list, show, replay or purge a controller's parked events",
                          description="Replay republishes through the controller's exchange with confirms and only "
                                      "then removes the parked copy; purge asks first (--yes to skip).")
    park.add_argument("action", choices=PARKED_ACTIONS, help="what to do with the selected parked events")
    park.add_argument("controller")
    park.add_argument("--key", metavar="K", help="only events of this item key")
    park.add_argument("--reason", metavar="R",
                      help="only events parked for this reason (max-attempts, permanent, undecodable, invalid, "
                           "too-many-deliveries, broker:delivery_limit)")
    park.add_argument("--limit", type=_positive, metavar="N", help="act on the first N selected events only")
    park.add_argument("--yes", action="store_true", help="purge without asking")
    park.add_argument("--json", action="store_true", help="print JSON")
    _add_options(park, BROKER_OPTS)

    demo = sub.add_parser("demo", help="run the example controllers and watch deployments converge")
    demo.add_argument("--deployments", type=int, default=20, metavar="N", help="deployments to create (default 20)")
    demo.add_argument("--replicas", type=int, default=3, metavar="N", help="replicas each (default 3)")
    demo.add_argument("--fail-rate", type=float, default=0.2, metavar="F",
                      help="fraction of provider calls that fail transiently (default 0.2)")
    demo.add_argument("--store", default=None, metavar="URL", help="sqlite:///path (default: a temp file)")
    demo.add_argument("--timeout-s", type=_arg(seconds()), default=120.0, metavar="S", help="give up after this long")
    _add_options(demo, RUN_OPTS - {"controllers"})
    return parser


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return n


def settings_from(args: argparse.Namespace, names: frozenset[str]) -> PoolSettings:
    file_values = load_toml(args.config) if getattr(args, "config", None) else {}
    flags = {name: getattr(args, name, None) for name in names}
    settings = resolve(flags, file_values=file_values, only=names)
    _use_tls(settings)
    return settings


def _use_tls(settings: PoolSettings) -> None:
    """Apply the TLS files to every connection this process (and its workers) opens."""
    from urllib.parse import urlsplit

    from .tls import use_tls

    b = settings.broker
    files = (b.tls_ca_file, b.tls_cert_file, b.tls_key_file)
    if not any(files):
        return
    if urlsplit(b.amqp_url).scheme != "amqps":
        raise ConfigError("--tls-ca-file/--tls-cert-file/--tls-key-file: need an amqps:// broker URL")
    use_tls(*files)


def _fail(code: int, message: str) -> int:
    print(f"ctlpool: {escape(message)}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "publish":
            return cmd_publish(args)
        if args.command == "topology":
            return cmd_topology(args)
        if args.command == "status":
            return cmd_status(args)
        if args.command == "parked":
            return cmd_parked(args)
        if args.command == "doctor":
            from .doctor import doctor

            b = settings_from(args, DOCTOR_OPTS).broker
            return doctor(b.amqp_url, args.fix, admin_node=b.admin_node, prefix=b.prefix)
        if args.command == "demo":
            from controllers.demo import run_demo

            return run_demo(args, settings_from(args, RUN_OPTS - {"controllers"}))
    except ConfigError as exc:
        return _fail(EXIT_CONFIG, f"error: {exc}")
    except PluginMissing as exc:
        return _fail(EXIT_UNAVAILABLE, str(exc))
    except BrokerUnavailable as exc:
        return _fail(EXIT_UNAVAILABLE, f"{exc}; is RabbitMQ running? {START_BROKER_HINT}")
    except TopologyMismatch as exc:
        return _fail(EXIT_TOPOLOGY, f"refusing to start: {exc}")
    except PublishError as exc:
        return _fail(1, f"publish failed: {exc}")
    except CtlpoolError as exc:
        return _fail(1, str(exc))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `ctlpool status | head`: the reader is gone; so is our output
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a shell reports it
    parser.error(f"unknown command {args.command}")


def cmd_run(args: argparse.Namespace) -> int:
    from .controller import load_controller
    from .logs import configure
    from .supervisor import Supervisor

    settings = settings_from(args, RUN_OPTS)
    if not settings.controllers:
        raise ConfigError("--controllers: required (MODULE:CLASS[,MODULE:CLASS...]); or set CTLPOOL_CONTROLLERS")
    configure(settings.log_format, settings.log_level)
    names = [load_controller(ref).name for ref in settings.controllers]
    if len(set(names)) != len(names):
        raise ConfigError(f"--controllers: two controllers share a name: {names}")
    notifier = Notifier.from_env()
    wait_for_topology(settings, names, notifier)
    return Supervisor(settings, notifier=notifier).run()


def wait_for_topology(settings: PoolSettings, names: list[str], notifier: Notifier | None = None) -> None:
    """Declare topology, retrying while the broker is unreachable (a service may start before it)."""
    import time

    from . import topology

    delay = 1.0
    while True:
        try:
            asyncio.run(topology.ensure(settings.broker, settings.topology, names))
            return
        except BrokerUnavailable as exc:
            log.warning("%s; retrying in %.0fs (%s)", exc, delay, START_BROKER_HINT)
            if notifier is not None:
                notifier.status(f"waiting for the broker: {exc}")
            time.sleep(delay)
            delay = min(delay * 2, settings.broker.reconnect_max_s)


def _parse_json(text: str, what: str) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise ConfigError(f"{what}: not valid JSON ({exc})") from None


def cmd_publish(args: argparse.Namespace) -> int:
    from .publisher import Publisher

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
    payload = _parse_json(args.payload, "JSON argument") if args.payload is not None else {}

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


def cmd_status(args: argparse.Namespace) -> int:
    from .status import collect, render

    settings = settings_from(args, STATUS_OPTS)
    snap = asyncio.run(collect(settings.broker, settings.topology, args.controller or None, args.listen_s,
                               replicas=True))
    print(_json(snap) if args.json else render(snap))
    return 0


def cmd_topology(args: argparse.Namespace) -> int:
    from . import topology
    from .amqp import connect

    settings = settings_from(args, TOPOLOGY_OPTS)
    b, t = settings.broker, settings.topology

    async def show() -> list[dict[str, Any]]:
        await topology.ensure(b, t, args.controller)
        conn = await connect(b.amqp_url, name="ctlpool-topology")
        try:
            out = []
            for c in args.controller:
                names = topology.Names(b.prefix, c)
                queues = [names.partition(i, t.partitions) for i in range(t.partitions)]
                queues += [names.tier(s) for s in t.tiers_s] + [names.parked]
                counts = await topology.counts(conn, queues)
                out.append({"controller": c, "exchange": names.exchange, "queue_type": t.queue_type,
                            "queues": [{"name": q.name, "ready": q.ready, "consumers": q.consumers}
                                       for q in counts if q is not None]})
            return out
        finally:
            conn.close()

    result = asyncio.run(show())
    if args.json:
        print(_json(result))
        return 0
    for c in result:
        print(f"{escape(c['exchange'])}  (x-consistent-hash, {len(c['queues'])} queues, {c['queue_type']})")
        for q in c["queues"]:
            print(f"  {escape(q['name']):<40} ready={q['ready']:<8} consumers={q['consumers']}")
    return 0


def cmd_parked(args: argparse.Namespace) -> int:
    from . import parked
    from .amqp import connect

    settings = settings_from(args, BROKER_OPTS)
    b = settings.broker
    selection = parked.Selection(key=args.key, reason=args.reason, limit=args.limit)
    if args.action == "purge" and not args.yes and not sys.stdin.isatty():
        return _fail(EXIT_CONFIG, "parked purge: no terminal to confirm on; add --yes to purge without asking")

    async def confirm(items: list[parked.Parked]) -> bool:
        question = escape(f"purge {len(items)} parked event(s) of {args.controller} ({selection.describe()}) "
                          f"from {b.prefix}.{args.controller}.parked? [y/N] ")
        answer = await asyncio.get_running_loop().run_in_executor(None, _ask, question)
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


def _json(value: Any) -> str:
    return json_safe(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode())


def _ask(question: str) -> str:
    try:
        return input(question)
    except EOFError:
        return ""


def _print_parked(args: argparse.Namespace, out: Any) -> int:
    from .parked import iso_time

    failed = out.failed or []
    if args.json:
        if args.action in ("list", "show"):
            print(_json([p.as_dict(body=args.action == "show") for p in out.matched]))
        else:
            print(_json({"queue": out.queue, "matched": len(out.matched), args.action + "d": out.done,
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


if __name__ == "__main__":
    sys.exit(main())
