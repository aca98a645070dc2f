"""``ctlpool demo``: the example controllers in a real pool, converging live.

Data flow: start ``ctlpool run`` with ``Deployments`` and ``Instances`` as a subprocess (its
log in a temp file, tailed for "all N workers ready" and for retries); write N desired
deployments into the store and publish one event each; poll the store ~4×/s and draw
one progress line on stderr until every deployment is converged. Then change the spec
(half get a new image, the rest a new replica count), publish again, watch them converge
again, and stop the pool with SIGTERM (it drains and exits 0). Timeout: say what is not
converged, stop the pool, return 1. Ctrl-C or SIGTERM: stop the pool cleanly (again: kill it).
"""

from __future__ import annotations

import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TextIO

from pool import BlockingPublisher, ConfigError, CtlpoolError
from pool.process import PoolExited, RunProcess
from pool.settings import OPTIONS, PoolSettings, redact_url

from .deployments import ENV_FAIL_RATE, DeploymentEvent
from .store import ENV_STORE, READY, Conflict, Deployment, Store

CONTROLLERS = "controllers.deployments:Deployments,controllers.deployments:Instances"
NAME_PREFIX = "demo-"
IMAGE_V1, IMAGE_V2 = "web:1.0", "web:1.1"
REFRESH_S = 0.25  # ~4 redraws a second: smooth without hammering the store
PLAIN_REFRESH_S = 2.0  # without a terminal, a plain progress line this often at most
STOP_GRACE_S = 15.0  # beyond the pool's own drain timeout, before we kill it
# Options the demo sets itself; every other setting is passed on as a flag.
OWN_OPTIONS = frozenset({"controllers", "amqp-url", "amqp-url-file", "prefix", "log-format"})
EXIT_INTERRUPTED = 130  # 128 + SIGINT, like the pool


def run_demo(args: Any, settings: PoolSettings) -> int:
    """Run the demo; 0 when everything converged and the pool drained, 1 otherwise, 130 on Ctrl-C."""
    if args.deployments < 1 or args.replicas < 1:
        raise ConfigError("--deployments and --replicas: expected positive integers")
    if not 0 <= args.fail_rate < 1:
        raise ConfigError(f"--fail-rate: expected a fraction in [0, 1), got {args.fail_rate}")
    with BlockingPublisher(settings.broker.amqp_url, prefix=settings.broker.prefix):
        pass  # an unreachable broker fails here, in one line, before anything starts
    tmp = Path(tempfile.mkdtemp(prefix="ctlpool-demo-"))
    store_url = args.store or f"sqlite://{tmp / 'store.db'}"
    try:
        store = Store(store_url)
    except ValueError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ConfigError(f"--store: {exc}") from None
    except Exception as exc:  # the driver's own errors (or its absence): one line, not a traceback
        shutil.rmtree(tmp, ignore_errors=True)
        raise CtlpoolError(f"--store {redact_url(store_url)}: cannot open it: {exc}") from None
    pool = PoolProcess(settings, tmp / "pool.log", env={ENV_STORE: store_url, ENV_FAIL_RATE: str(args.fail_rate)})
    ok = False
    on_sigterm = _interrupt_on_sigterm()
    try:
        converged = _run(args, settings, store, pool)
        code = pool.stop(settings.worker.drain_timeout_s + STOP_GRACE_S)
        print(f"pool stopped (exit {code})", file=sys.stderr)
        ok = converged and code == 0
        return 0 if ok else 1
    except KeyboardInterrupt:
        print("\ninterrupted: stopping the pool (Ctrl-C again kills it)", file=sys.stderr)
        try:
            pool.stop(settings.worker.drain_timeout_s + STOP_GRACE_S)
        except KeyboardInterrupt:
            pool.kill()
        return EXIT_INTERRUPTED
    finally:
        signal.signal(signal.SIGTERM, on_sigterm)
        pool.kill()
        store.close()
        if ok:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"pool log kept in {pool.log_path}", file=sys.stderr)


def _interrupt_on_sigterm() -> Any:
    """SIGTERM stops the demo like Ctrl-C (the pool, in its own session, would outlive us); returns the old handler."""
    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, interrupt)


def _run(args: Any, settings: PoolSettings, store: Store, pool: "PoolProcess") -> bool:
    deadline = time.monotonic() + args.timeout_s
    names = [f"{NAME_PREFIX}{i:02d}" for i in range(args.deployments)]
    for d in store.deployments():
        if d.name.startswith(NAME_PREFIX):
            store.purge(d.name)  # a previous demo's rows
    print(f"store {redact_url(store.url)}; starting {settings.workers} workers on prefix {settings.broker.prefix!r}…",
          file=sys.stderr)
    started = time.monotonic()
    if not pool.ready_by(deadline):
        return False
    print(f"pool ready in {time.monotonic() - started:.1f} s", file=sys.stderr)

    for name in names:
        store.insert(Deployment(name, IMAGE_V1, args.replicas))
    if not _converge("create", "converged", store, settings, pool, names, deadline):
        return False

    rescaled = args.replicas - 1 if args.replicas > 1 else 2
    for i, name in enumerate(names):
        if i % 2 == 0:
            _change_spec(store, name, image=IMAGE_V2)
        else:
            _change_spec(store, name, replicas=rescaled)
    print(f"update: {len(names[::2])} deployments to {IMAGE_V2}, {len(names[1::2])} to {rescaled} replicas",
          file=sys.stderr)
    return _converge("update", "after the update, converged", store, settings, pool, names, deadline)


def _change_spec(store: Store, name: str, **spec: Any) -> None:
    """Read-modify-write with the version check; the controller may be writing status meanwhile."""
    while True:
        d = store.get(Deployment, name)
        assert d is not None
        try:
            store.update(d, generation=d.generation + 1, **spec)
            return
        except Conflict:
            continue


@dataclass(frozen=True)
class Progress:
    ready: int
    """Instances ready at their deployment's desired image."""
    desired: int
    converged: int
    total: int
    stragglers: tuple[str, ...]

    @property
    def done(self) -> bool:
        return self.converged == self.total and self.ready == self.desired


def measure(store: Store, names: list[str]) -> Progress:
    wanted = set(names)
    deps = {d.name: d for d in store.deployments() if d.name in wanted}
    ready = sum(1 for i in store.instances() if (d := deps.get(i.deployment)) is not None
                and i.ordinal < d.replicas and i.state == READY and i.running == d.image)
    stragglers = tuple(f"{n} ({d.ready}/{d.replicas} ready, {d.status}, generation {d.observed_generation}/"
                       f"{d.generation})" if (d := deps.get(n)) else f"{n} (missing)"
                       for n in names if n not in deps or not deps[n].converged)
    return Progress(ready, sum(d.replicas for d in deps.values()), len(names) - len(stragglers), len(names),
                    stragglers)


def _converge(phase: str, verb: str, store: Store, settings: PoolSettings, pool: "PoolProcess",
              names: list[str], deadline: float) -> bool:
    """Nudge every deployment, then draw progress until all converge; False on timeout or a dead pool."""
    failures0, conflicts0 = pool.log.provider_failures, pool.log.conflicts
    t0 = time.monotonic()
    with BlockingPublisher(settings.broker.amqp_url, prefix=settings.broker.prefix) as pub:
        pub.publish_many(("deployments", n, DeploymentEvent(reason="spec")) for n in names)
    line = ProgressLine(sys.stderr)
    while True:
        pool.log.poll()
        p = measure(store, names)
        elapsed = time.monotonic() - t0
        retries = pool.log.provider_failures - failures0 + pool.log.conflicts - conflicts0
        line.draw(f"{phase}: instances {p.ready}/{p.desired} ready · deployments {p.converged}/{p.total} "
                  f"converged · {retries} retries · {elapsed:.1f} s", final=p.done)
        if p.done:
            failures, conflicts = pool.log.provider_failures - failures0, pool.log.conflicts - conflicts0
            print(f"{verb} {p.total} deployments ({p.desired} instances) in {elapsed:.1f} s; "
                  f"{failures} provider failures and {conflicts} write conflicts retried", flush=True)
            if pool.log.parked:
                print(f"warning: {pool.log.parked} events parked so far (see {pool.log_path})", file=sys.stderr)
            return True
        if pool.proc is not None and pool.proc.poll() is not None:
            line.end()
            print(f"the pool exited with {pool.proc.returncode}:\n{pool.tail()}", file=sys.stderr)
            return False
        if time.monotonic() > deadline:
            line.end()
            print(f"timed out: {len(p.stragglers)} deployments not converged: {', '.join(p.stragglers[:10])}"
                  f"{' …' if len(p.stragglers) > 10 else ''}", file=sys.stderr)
            return False
        time.sleep(REFRESH_S)


class ProgressLine:
    """One line redrawn in place on a terminal; plain lines, at most every few seconds, otherwise."""

    def __init__(self, out: TextIO, clock: Callable[[], float] = time.monotonic) -> None:
        self.out = out
        self.tty = out.isatty()
        self.clock = clock
        self._last = float("-inf")

    def draw(self, text: str, *, final: bool = False) -> None:
        if self.tty:
            self.out.write(f"\r{text}\x1b[K" + ("\n" if final else ""))
        elif final or self.clock() - self._last >= PLAIN_REFRESH_S:
            self.out.write(text + "\n")
            self._last = self.clock()
        self.out.flush()

    def end(self) -> None:
        if self.tty:
            self.out.write("\n")


class PoolLog:
    """Tails the pool's text log: retries by cause, parked events.

    It matches the pool's own wording ("reconcile failed … ProviderError",
    "parking event"), so a change of those log messages shows up here as zero counts.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._partial = b""
        self.provider_failures = 0
        self.conflicts = 0
        self.parked = 0

    def poll(self) -> None:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self._offset)
                chunk = fh.read()
        except FileNotFoundError:
            return
        self._offset += len(chunk)
        *lines, self._partial = (self._partial + chunk).split(b"\n")
        for raw in lines:
            line = raw.decode(errors="replace")
            if "reconcile failed" in line:
                self.provider_failures += "ProviderError" in line
                self.conflicts += "Conflict" in line
            elif "parking event" in line:
                self.parked += 1


class PoolProcess(RunProcess):
    """``ctlpool run`` with the example controllers (``pool.process``), its log tailed for the counts."""

    def __init__(self, settings: PoolSettings, log_path: Path, *, env: dict[str, str]) -> None:
        super().__init__(pool_args(settings), log_path, env={**env, "CTLPOOL_AMQP_URL": settings.broker.amqp_url})
        self.log = PoolLog(log_path)

    def ready_by(self, deadline: float) -> bool:
        """Start it and wait until it is ready or ``deadline`` (monotonic) passes; False says why on stderr."""
        try:
            self.start().wait_ready(max(deadline - time.monotonic(), 0.0))
            return True
        except (PoolExited, TimeoutError) as exc:
            print(exc, file=sys.stderr)
            return False


def pool_args(settings: PoolSettings) -> list[str]:
    """``ctlpool run`` flags honouring ``settings`` (never the broker URL: it has a password)."""
    cmd = ["--controllers", CONTROLLERS, "--prefix", settings.broker.prefix, "--log-format", "text"]
    for opt in OPTIONS:
        if opt.name in OWN_OPTIONS:
            continue
        value = getattr(settings if opt.group is None else getattr(settings, opt.group), opt.attr)
        if value is not None:  # unset optional settings (a TLS file) stay unset
            cmd += [f"--{opt.name}", _flag(value)]
    return cmd


def _flag(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)
