"""``python -m bench SCENARIO [options]``: argument parsing, then one scenario, then the report.

    saturate   pool vs floor, publishers flat out          (bench.scenarios.throughput)
    drain      pool vs floor on a preloaded backlog        (bench.scenarios.throughput)
    latency    paced load, end-to-end latency              (bench.scenarios.latency)
    hotkeys    Zipf keys, slow controller, coalescing      (bench.scenarios.latency)
    sweep      prefetch x concurrency grid                 (bench.scenarios.grid)
    scale      pool vs floor at 1..N worker processes      (bench.scenarios.grid)
    cluster    the pool on a 3-node cluster vs one broker  (bench.scenarios.cluster)
    partitions broker CPU per partition count, paced load  (bench.scenarios.resize)
    resize     grow 8 -> 64 and back under load             (bench.scenarios.resize)
    profile    one Worker under cProfile, CPU per event    (bench.profile_worker)

Every scenario writes ``--out DIR/results.json`` (and PNGs when matplotlib is there), prints
a table, and exits ``EXIT_VIOLATED`` if it lost an event or saw one key reconciled twice at
once.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Sequence

from pool.settings import DEFAULT_AMQP_URL, TopologySettings, WorkerSettings

EXIT_OK = 0
EXIT_VIOLATED = 1  # a guarantee broke while measuring: lost > 0 or overlaps > 0
EXIT_USAGE = 2  # bad flags (argparse's code)
EXIT_FAILED = 3  # the bench itself could not run (broker down, pool did not start, publisher error)
EXIT_TERMINATED = 143  # SIGTERM: cleaned up and stopped (128 + SIGTERM)


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N[,N...], got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    cpus = len(os.sched_getaffinity(0))
    wk, topo = WorkerSettings(), TopologySettings()
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("pool and broker")
    g.add_argument("--url", default=os.environ.get("CTLPOOL_AMQP_URL", DEFAULT_AMQP_URL),
                   help="AMQP URL (default $CTLPOOL_AMQP_URL or the local broker)")
    g.add_argument("--workers", type=int, default=cpus,
                   help=f"worker processes of the pool and of the floor; for scale the largest count (default {cpus})")
    g.add_argument("--prefetch", type=int, default=wk.prefetch, help=f"per partition (default {wk.prefetch})")
    g.add_argument("--concurrency", type=int, default=wk.concurrency,
                   help=f"reconciles in flight per worker (default {wk.concurrency})")
    g.add_argument("--partitions", type=int, default=topo.partitions, help=f"default {topo.partitions}")
    g.add_argument("--queue-type", choices=("quorum", "classic"), default=topo.queue_type,
                   help=f"default {topo.queue_type}")
    g = common.add_argument_group("load")
    g.add_argument("--events", type=int, help="events per measured load (scenario default)")
    g.add_argument("--duration-s", type=float, help="latency: seconds of paced load (default 20; sweep: 4)")
    g.add_argument("--rate", type=float, help="latency, sweep: events/s in total (default 2000)")
    g.add_argument("--warmup-s", type=float, default=1.0,
                   help="latency: seconds of paced load before --duration-s whose events are reconciled and "
                        "counted but whose latencies are reported apart (default 1; 0: none)")
    g.add_argument("--publishers", type=int, default=2, help="publisher processes (default 2)")
    g.add_argument("--keys", type=int, default=10_000, help="distinct item keys (default 10000)")
    g.add_argument("--skew", type=float, default=1.1, help="hotkeys: Zipf exponent (default 1.1)")
    g.add_argument("--sleep-ms", type=float,
                   help="hotkeys: time each reconcile takes (default 2); sweep: reconciles take this long "
                        "(asyncio.sleep) instead of none")
    g.add_argument("--rounds", type=int, default=1,
                   help="saturate, drain, latency, scale: pool/floor pairs per setting, alternating order (default 1)")
    g.add_argument("--prefetch-grid", type=_ints, default=(10, 50, 200), help="sweep rows (default 10,50,200)")
    g.add_argument("--concurrency-grid", type=_ints, default=(8, 64), help="sweep columns (default 8,64)")
    g.add_argument("--counts", type=_ints, help="scale: worker counts (default 1..--workers)")
    g.add_argument("--scale-load", choices=("saturate", "drain"), default="saturate",
                   help="scale: live publishers or a preloaded backlog (default saturate)")
    g = common.add_argument_group("output")
    g.add_argument("--out", type=Path, help="results directory (default out/bench/SCENARIO)")
    g.add_argument("--no-plots", action="store_true", help="skip PNGs")
    g.add_argument("--keep-records", action="store_true", help="keep the per-reconcile record files")

    parser = argparse.ArgumentParser(prog="python -m bench", description="ctlpool load tests (bench/README.md)")
    sub = parser.add_subparsers(dest="scenario", metavar="SCENARIO", required=True)
    from .scenarios import HELP

    for name, text in HELP.items():
        sub.add_parser(name, parents=[common], help=text, description=text)
    prof = sub.add_parser("profile", parents=[common], help="one Worker in-process under cProfile: CPU per event",
                          description="one Worker in-process under cProfile: CPU per event, pool vs floor")
    prof.add_argument("--top", type=int, default=25, help="functions listed (default 25)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for flag in ("workers", "prefetch", "concurrency", "partitions", "publishers", "keys", "rounds"):
        if getattr(args, flag) < 1:
            print(f"python -m bench: --{flag.replace('_', '-')} must be >= 1", file=sys.stderr)
            return EXIT_USAGE
    if args.warmup_s < 0:
        print("python -m bench: --warmup-s must be >= 0", file=sys.stderr)
        return EXIT_USAGE
    out: Path = args.out or Path("out") / "bench" / args.scenario
    out.mkdir(parents=True, exist_ok=True)
    # SIGTERM (a CI timeout) unwinds like Ctrl-C: pools drained, publishers killed, prefixes deleted
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(EXIT_TERMINATED))
    if args.scenario == "profile":
        from .profile_worker import profile

        try:
            return profile(args, out)
        except Exception as exc:  # noqa: BLE001 - one line, then the exit code says "the bench failed"
            print(f"\npython -m bench profile: failed: {exc}", file=sys.stderr)
            return EXIT_FAILED
    from .report import render, write
    from .scenarios import SCENARIOS
    from .scenarios.common import Options

    opts = Options(url=args.url, out=out.resolve(), workers=args.workers, prefetch=args.prefetch,
                   concurrency=args.concurrency, partitions=args.partitions, queue_type=args.queue_type,
                   publishers=args.publishers, keys=args.keys, rounds=args.rounds, plots=not args.no_plots,
                   keep_records=args.keep_records, events=args.events, duration_s=args.duration_s, rate=args.rate,
                   warmup_s=args.warmup_s,
                   skew=args.skew, sleep_ms=args.sleep_ms, prefetch_grid=args.prefetch_grid,
                   concurrency_grid=args.concurrency_grid, counts=args.counts, scale_load=args.scale_load)
    try:
        outcome = SCENARIOS[args.scenario](opts)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one line, then the exit code says "the bench failed"
        print(f"\npython -m bench {args.scenario}: failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    path = write(out, outcome)
    print(render(outcome, path))
    if outcome.violated:
        print(f"GUARANTEE VIOLATED: lost={outcome.results['lost']} overlaps={outcome.results['overlaps']}",
              file=sys.stderr)
        return EXIT_VIOLATED
    return EXIT_OK
