"""``python -m pool.devcluster up|down|status|kill N|freeze N|thaw N|stop-app N|start-app N|restart N`` (``make cluster``)."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time

from ..exits import EXIT_CONFIG
from . import (DEFAULT_DIR, DIR_ENV, ERL_ARGS_ENV, NODE_COUNT, NODES, ClusterError, LocalCluster, MissingTool,
               resolve_node)


def _node_arg(text: str) -> int:
    try:
        return resolve_node(text)
    except ValueError as exc:  # argparse would say only "invalid _node_arg value"
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pool.devcluster", description="A local 3-node RabbitMQ cluster "
                                f"({NODES[0].name}.., AMQP ports {NODES[0].amqp_port}..) beside the default broker.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("up", help="start the missing nodes, cluster them, enable the plugin (idempotent)")
    down = sub.add_parser("down", help="stop all three nodes")
    down.add_argument("--wipe", action="store_true", help=f"then delete the data directory (${DIR_ENV}, {DEFAULT_DIR})")
    sub.add_parser("status", help="each node's name, URL and state; exit 1 unless all run")
    for name, text in (("kill", "SIGKILL the node's beam.smp"),
                       ("freeze", "SIGSTOP the node's beam.smp (a paused VM: connections stay open, nothing answers)"),
                       ("thaw", "SIGCONT a frozen node"), ("stop-app", "rabbitmqctl stop_app"),
                       ("start-app", "rabbitmqctl start_app, and wait until it runs"),
                       ("restart", "stop it if it runs, start it, wait until it is back in the cluster")):
        one = sub.add_parser(name, help=text)
        one.add_argument("node", type=_node_arg, help=f"1..{NODE_COUNT}, c1, ctlpool-c1 or {NODES[0].name}")
    return p.parse_args(argv)


def _sudo_again(argv: list[str]) -> None:
    """Not root, but sudo works without a password: run this same command through it."""
    if shutil.which("sudo") and subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode == 0:
        keep = [f"{k}={os.environ[k]}" for k in (DIR_ENV, ERL_ARGS_ENV) if k in os.environ]
        os.execvp("sudo", ["sudo", "-n", "env", *keep, sys.executable, "-m", "pool.devcluster", *argv])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if os.geteuid() != 0:
        _sudo_again(argv)
    cluster, t0 = LocalCluster(), time.monotonic()
    cluster.say = lambda line: print(f"[{time.monotonic() - t0:5.1f} s] {line}", flush=True)
    try:
        cluster.preflight()
        if args.command == "up":
            changed = cluster.up()
            print(f"cluster {'up' if changed else 'already up, nothing to do'} ({time.monotonic() - t0:.1f} s):")
        elif args.command == "down":
            cluster.down(args.wipe)
        elif args.command == "kill":
            print(f"{cluster.node(args.node).name}: killed pid {cluster.kill(args.node)}")
        elif args.command in ("freeze", "thaw"):
            pid = cluster.freeze(args.node, frozen=args.command == "freeze")
            print(f"{cluster.node(args.node).name}: {args.command} pid {pid}" if pid else
                  f"{cluster.node(args.node).name}: no process")
            return 0  # asking a frozen node for its state would hang
        elif args.command != "status":
            {"stop-app": cluster.stop_app, "start-app": cluster.start_app, "restart": cluster.restart}[args.command](
                args.node)  # status: just the lines below
    except ClusterError as exc:
        print(f"devcluster: {exc}", file=sys.stderr)
        return EXIT_CONFIG if isinstance(exc, MissingTool) else 1
    lines = cluster.status_lines(["running"] * len(cluster.nodes) if args.command == "up" else None)  # up saw them
    print("\n".join(lines))
    if args.command in ("up", "status"):
        print(f"CTLPOOL_AMQP_URL={cluster.url_list()}")
    return 0 if args.command != "status" or all(line.endswith(" running") for line in lines) else 1


if __name__ == "__main__":
    sys.exit(main())
