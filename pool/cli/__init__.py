"""The ``ctlpool`` command: argument parsing only; each command lives in a module of this package
(``run``, ``publish``, ``topology``, ``status``, ``parked``), shared pieces in ``common``, and the
work in the ``pool`` modules they call.

    ctlpool run        supervisor + workers            (pool.supervisor)
    ctlpool publish    send events, one or a batch     (pool.publisher)
    ctlpool topology   declare, show, resize a controller  (pool.topology, pool.resize)
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
import os
import sys
from typing import Sequence

from ..errors import BrokerUnavailable, ConfigError, CtlpoolError, PluginMissing, PublishError, TopologyMismatch
from ..exits import EXIT_CONFIG, EXIT_TOPOLOGY, EXIT_UNAVAILABLE
from ..resize import ResizeRefused
from ..settings import seconds
from .common import (BROKER_OPTS, DOCTOR_OPTS, PARKED_ACTIONS, RUN_OPTS, START_BROKER_HINT, STATUS_OPTS,
                     TOPOLOGY_OPTS, Parser, add_options, arg, fail, positive, settings_from, version_text)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="ctlpool", description="Kubernetes-style controllers on RabbitMQ, one key at a time.")
    parser.add_argument("--version", action="version", version=f"ctlpool {version_text()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True

    run = sub.add_parser("run", help="run the supervisor and its workers")
    add_options(run, RUN_OPTS)

    pub = sub.add_parser("publish", help="send an event (or --batch of them from stdin)")
    pub.add_argument("controller")
    pub.add_argument("key", nargs="?")
    pub.add_argument("payload", nargs="?", metavar="JSON", help="event body (default {})")
    pub.add_argument("--batch", action="store_true", help="read KEY<TAB>JSON lines from stdin, pipelined")
    add_options(pub, BROKER_OPTS)

    topo = sub.add_parser("topology", help="declare (idempotently) and show controllers' queues; resize one online",
                          usage="ctlpool topology [declare] CONTROLLER... | resize CONTROLLER --partitions N",
                          description="Declare controllers (their live partition count is the broker's; "
                                      "--partitions is what a new one gets), or grow/shrink one online with "
                                      "'resize': it pauses the controller's members, changes the ring, and resumes "
                                      "them, every step kept on the broker so any process can finish it.")
    topo.add_argument("words", nargs="+", metavar="[declare|resize] CONTROLLER")
    topo.add_argument("--json", action="store_true", help="print JSON")
    add_options(topo, TOPOLOGY_OPTS)

    st = sub.add_parser("status", help="members, partition owners, queued and parked counts")
    st.add_argument("controller", nargs="*", help="controllers to show (default: all the members run)")
    st.add_argument("--json", action="store_true", help="print JSON")
    st.add_argument("--listen-s", type=arg(seconds()), default=2.5, metavar="S",
                    help="how long to listen for heartbeats (default 2.5)")
    add_options(st, STATUS_OPTS)

    doc = sub.add_parser("doctor", help="check the broker and the consistent-hash plugin (--fix: start/enable locally)")
    doc.add_argument("--fix", action="store_true", help="start a local broker that is installed but stopped; enable the plugin")
    add_options(doc, DOCTOR_OPTS)

    park = sub.add_parser("parked", help="list, show, replay or purge a controller's parked events",
                          description="Replay republishes through the controller's exchange with confirms and only "
                                      "then removes the parked copy; purge asks first (--yes to skip).")
    park.add_argument("action", choices=PARKED_ACTIONS, help="what to do with the selected parked events")
    park.add_argument("controller")
    park.add_argument("--key", metavar="K", help="only events of this item key")
    park.add_argument("--reason", metavar="R",
                      help="only events parked for this reason (max-attempts, permanent, undecodable, invalid, "
                           "too-many-deliveries, broker:delivery_limit)")
    park.add_argument("--limit", type=positive, metavar="N", help="act on the first N selected events only")
    park.add_argument("--yes", action="store_true", help="purge without asking")
    park.add_argument("--json", action="store_true", help="print JSON")
    add_options(park, BROKER_OPTS)

    demo = sub.add_parser("demo", help="run the example controllers and watch deployments converge")
    demo.add_argument("--deployments", type=int, default=20, metavar="N", help="deployments to create (default 20)")
    demo.add_argument("--replicas", type=int, default=3, metavar="N", help="replicas each (default 3)")
    demo.add_argument("--fail-rate", type=float, default=0.2, metavar="F",
                      help="fraction of provider calls that fail transiently (default 0.2)")
    demo.add_argument("--store", default=None, metavar="URL", help="sqlite:///path (default: a temp file)")
    demo.add_argument("--timeout-s", type=arg(seconds()), default=120.0, metavar="S", help="give up after this long")
    add_options(demo, RUN_OPTS - {"controllers"})
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            from .run import cmd_run

            return cmd_run(args)
        if args.command == "publish":
            from .publish import cmd_publish

            return cmd_publish(args)
        if args.command == "topology":
            from .topology import cmd_topology

            return cmd_topology(args)
        if args.command == "status":
            from .status import cmd_status

            return cmd_status(args)
        if args.command == "parked":
            from .parked import cmd_parked

            return cmd_parked(args)
        if args.command == "doctor":
            from ..doctor import doctor

            b = settings_from(args, DOCTOR_OPTS).broker
            return doctor(b.amqp_url, args.fix, admin_node=b.admin_node, prefix=b.prefix)
        if args.command == "demo":
            from controllers.demo import run_demo

            return run_demo(args, settings_from(args, RUN_OPTS - {"controllers"}))
    except ConfigError as exc:
        return fail(EXIT_CONFIG, f"error: {exc}")
    except PluginMissing as exc:
        return fail(EXIT_UNAVAILABLE, str(exc))
    except BrokerUnavailable as exc:
        return fail(EXIT_UNAVAILABLE, f"{exc}; is RabbitMQ running? {START_BROKER_HINT}")
    except TopologyMismatch as exc:
        return fail(EXIT_TOPOLOGY, f"refusing to start: {exc}")
    except ResizeRefused as exc:
        return fail(EXIT_TOPOLOGY, f"resize refused: {exc}")
    except PublishError as exc:
        return fail(1, f"publish failed: {exc}")
    except CtlpoolError as exc:
        return fail(1, str(exc))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `ctlpool status | head`: the reader is gone; so is our output
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a shell reports it
    parser.error(f"unknown command {args.command}")
