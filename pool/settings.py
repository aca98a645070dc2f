"""Settings: grouped frozen dataclasses, filled from flags > ``CTLPOOL_*`` env > TOML > defaults.

Data flow: ``OPTIONS`` lists every tunable once (flag name, parser, default, help). The CLI
turns it into argparse flags that default to ``None``; ``resolve`` then takes, per option,
the first value found among the flag, the environment variable ``CTLPOOL_<NAME>`` and the
TOML file's key ``<name>`` (dashes or underscores), parses and validates it, and builds
``PoolSettings``. Any bad value raises ``ConfigError`` naming the flag and where it came from;
so does a pair that only fails together (``--member-timeout-s`` against ``--heartbeat-interval-s``).
Broker URLs are printed only through ``redact_url``.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import tempfile
import tomllib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from .errors import ConfigError
from .retries import DEFAULT_TIERS_S
from .urls import parse_urls, read_url_file, redact_url, split_urls  # noqa: F401 - split_urls re-exported

log = logging.getLogger("ctlpool.settings")

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"

MAX_U16 = 65535  # AMQP short-uint fields: basic.qos prefetch_count, the connection's heartbeat
# pool.topology.BROKER_DELIVERY_LIMIT, mirrored (topology imports this module); a test keeps them equal.
# The broker's x-delivery-limit is the backstop behind --max-deliveries, so it must stay far above it.
BROKER_DELIVERY_LIMIT = 20
MAX_DELIVERIES = BROKER_DELIVERY_LIMIT // 2
MAX_WORKERS = 4096  # more processes than any host has CPUs; a typo (40000) must not fork-bomb the host
MAX_CONCURRENCY = 10_000  # each plain-def reconcile in flight holds a thread; far past this a host runs out
MAX_SECONDS = 86_400.0  # a day: beyond any sane timeout or interval, and far from timer overflow (time_t)
MIN_HEARTBEAT_INTERVAL_S = 0.01  # each worker publishes every interval: faster floods the members exchange
MEMBER_TIMEOUT_HEARTBEATS = 2  # a member is dropped only after missing at least this many heartbeats
MAX_PARTITIONS = 1000  # partition queue names keep three digits (p000-p999); past a few hundred, see "Broker sizing"
MAX_WEIGHT = 1000.0  # a host's share per worker relative to others: beyond this it is a typo, not a plan
MAX_TIER_S = 366 * 86_400  # a delay tier past a year and a day is a unit mistake (the broker refuses ~4,000 years)


@dataclass(frozen=True)
class BrokerSettings:
    """Where RabbitMQ is and how we name things on it."""

    amqp_url: str = DEFAULT_AMQP_URL
    """AMQP URL, ``amqp://user:pass@host:port/vhost``; printed only redacted."""
    prefix: str = "ctl"
    """Prefix of every exchange and queue name (``ctl.deployments.p000``)."""
    heartbeat_s: int = 20
    """AMQP heartbeat, 1-65535 s (a 16-bit field); a dead broker or peer is noticed within ~2x this."""
    reconnect_max_s: float = 30.0
    """Cap on the reconnect backoff (starts at 0.5 s, doubles, ±20% jitter)."""
    tls_ca_file: str | None = None
    """PEM file of the CA(s) that signed the broker's certificate (``amqps://``); default: the system's CAs."""
    tls_cert_file: str | None = None
    """PEM client certificate for ``amqps://`` (may hold the key too); for brokers that require one."""
    tls_key_file: str | None = None
    """PEM private key of ``tls_cert_file`` when it is a separate file."""
    admin_node: str | None = None
    """``ctlpool status`` / ``doctor``: the node ``rabbitmqctl -n`` asks where queues are led (``pool.replicas``)."""


@dataclass(frozen=True)
class TopologySettings:
    """Queues per controller. Changing these for an existing controller is refused."""

    partitions: int = 16
    """Partition queues a *new* controller is declared with (a live one keeps its layout's count until
    ``ctlpool topology resize``); the ceiling on workers sharing one controller. 16: measured at
    2,000 events/s on quorum queues, 8/16/32/64 partitions cost the broker 77/80/83/86% of a core
    (p99 8/6/13/15 ms), and each partition takes ~3 of the broker's file handles; with resizing
    online, start small and grow (``bench/README.md``, "partitions")."""
    queue_type: str = "quorum"
    """``quorum`` (replicated, single-active-consumer lock) or ``classic`` (exclusive consumer)."""
    tiers_s: tuple[int, ...] = DEFAULT_TIERS_S
    """TTLs of the delay-tier queues serving retries and ``requeue_after``."""
    replicas: int = 0
    """Replicas of each quorum queue (``x-quorum-initial-group-size``); 0: the broker's default
    (``quorum_cluster_size``, 3: every node of a 3-node cluster, 3 of a 5-node one)."""
    max_deliveries: int = 3
    """An event that was inside a reconcile when its worker died this many times is parked; 1-10,
    half the broker's own ``x-delivery-limit`` backstop (20) at most. Only those deaths count
    (``pool.journal``): flaps, broker restarts, drains and freezes redeliver without blame, and
    the supervisor's crash-loop guard ignores deaths inside a reconcile, so it can't give up first."""


@dataclass(frozen=True)
class WorkerSettings:
    """One worker process."""

    prefetch: int = 50
    """Unacked deliveries per partition consumer, 1-65535 (a 16-bit field); 50 keeps a 2-core worker busy
    without hoarding."""
    concurrency: int = 64
    """Reconciles in flight per worker (async ones on the loop, sync ones in threads)."""
    reconcile_timeout_s: float = 300.0
    """A reconcile running longer fails (and retries); far under the broker's 30-min consumer timeout."""
    drain_timeout_s: float = 60.0
    """On SIGTERM, in-flight reconciles get this long to finish before the worker quits anyway."""
    reroute_on_acquire: bool = True
    """Re-route a partition's backlog on acquiring it (ring-drift guard); off only for RabbitMQ >= 4.3."""
    heartbeat_interval_s: float = 1.0
    """How often each worker announces itself on ``ctl.members``."""
    member_timeout_s: float = 5.0
    """A member silent this long is gone and its partitions move (about 5 missed heartbeats); at least
    2x ``heartbeat_interval_s``."""


@dataclass(frozen=True)
class PoolSettings:
    """Everything ``ctlpool run`` needs."""

    controllers: tuple[str, ...] = ()
    """``module:Class`` references of the controllers to run."""
    workers: int = field(default_factory=lambda: len(os.sched_getaffinity(0)))
    """Worker processes on this host; defaults to the usable CPUs."""
    pin: bool | None = None
    """Pin worker i to the i-th usable CPU (wrapping around); None (auto): unless the broker runs
    on this host (``pool.pinning``)."""
    node_id: str = field(default_factory=socket.gethostname)
    """This host's name among the members; must be unique per host."""
    weight: float = 1.0
    """This host's relative share of partitions per worker."""
    log_format: str = "json"
    """``json`` (one object a line, for journald) or ``text``."""
    log_level: str = "info"
    metrics_port: int = 0
    """Port of the supervisor's ``/metrics``, ``/livez``, ``/readyz``; 0 = no endpoint (9464 is the usual one)."""
    metrics_host: str = "127.0.0.1"
    """Address the metrics endpoint listens on; ``0.0.0.0`` to let a remote Prometheus scrape it."""
    state_dir: str = field(default_factory=lambda: default_state_dir(os.environ))
    """Where workers journal their in-flight deliveries (crash attribution) and the node id is locked;
    default: systemd's ``$RUNTIME_DIRECTORY``, else ``$XDG_RUNTIME_DIR/ctlpool``, else ``ctlpool-<uid>``
    in the temp directory; created 0700, refused if anyone else controls it (``pool.statedir``)."""
    broker: BrokerSettings = field(default_factory=BrokerSettings)
    topology: TopologySettings = field(default_factory=TopologySettings)
    worker: WorkerSettings = field(default_factory=WorkerSettings)


def default_state_dir(env: Mapping[str, str]) -> str:
    """systemd's RuntimeDirectory= (tmpfs: a journal only has to outlive a process, not the host),
    else the user's private runtime directory, else a directory of ours in the temp directory
    (``pool.statedir`` refuses it if someone else made it first)."""
    runtime = env.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if runtime:
        return runtime
    xdg = env.get("XDG_RUNTIME_DIR", "")
    if xdg:
        return os.path.join(xdg, "ctlpool")
    return os.path.join(tempfile.gettempdir(), f"ctlpool-{os.getuid()}")


# ---- parsers: str | TOML value -> value, raising ValueError with a short reason ----

def _positive_int(v: Any) -> int:
    if isinstance(v, bool):
        raise ValueError("expected a positive integer")
    try:
        n = int(v)
    except (TypeError, ValueError):
        raise ValueError("expected a positive integer") from None
    if n < 1 or (isinstance(v, float) and v != n):
        raise ValueError("expected a positive integer")
    return n


def _int_in(lo: int, hi: int, why: str = "") -> Callable[[Any], int]:
    """A parser of whole numbers from ``lo`` to ``hi``; ``why`` tells where the bound comes from."""
    expected = f"expected a whole number from {lo} to {hi}{why}"

    def parse(v: Any) -> int:
        if isinstance(v, bool):
            raise ValueError(expected)
        try:
            n = int(v)
        except (TypeError, ValueError):
            raise ValueError(expected) from None
        if not lo <= n <= hi or (isinstance(v, float) and v != n):
            raise ValueError(expected)
        return n
    return parse


def _positive_float(v: Any) -> float:
    if isinstance(v, bool):  # TOML true is not 1.0
        raise ValueError("expected a positive number")
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise ValueError("expected a positive number") from None
    if not x > 0 or x != x or x == float("inf"):
        raise ValueError("expected a positive number")
    return x


def _number_upto(hi: float) -> Callable[[Any], float]:
    """A parser of numbers more than 0 and at most ``hi``."""
    expected = f"expected a number more than 0 and at most {hi:g}"

    def parse(v: Any) -> float:
        try:
            x = _positive_float(v)
        except ValueError:
            raise ValueError(expected) from None
        if x > hi:
            raise ValueError(expected)
        return x
    return parse


def seconds(lo: float = 0.0, hi: float = MAX_SECONDS) -> Callable[[Any], float]:
    """A parser of finite seconds up to ``hi``: more than 0 (``lo`` = 0), else from ``lo``."""
    expected = f"expected seconds, more than 0 and at most {hi:g}" if lo == 0 else \
        f"expected seconds from {lo:g} to {hi:g}"

    def parse(v: Any) -> float:
        try:
            x = _positive_float(v)
        except ValueError:
            raise ValueError(expected) from None
        if not lo <= x <= hi:
            raise ValueError(expected)
        return x
    return parse


def _bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def _pin(v: Any) -> bool | None:
    if isinstance(v, str) and v.strip().lower() == "auto":
        return None
    try:
        return _bool(v)
    except ValueError:
        raise ValueError("expected auto, true or false") from None


def _choice(*allowed: str) -> Callable[[Any], str]:
    def parse(v: Any) -> str:
        s = str(v).strip().lower()
        if s not in allowed:
            raise ValueError(f"expected one of {', '.join(allowed)}")
        return s
    return parse


def _name(v: Any) -> str:
    s = str(v).strip()
    if not s or any(c in s for c in " /\t\n"):
        raise ValueError("expected a non-empty name without spaces or slashes")
    return s


def _erlang_node(v: Any) -> str:
    s = str(v).strip()
    if not re.fullmatch(r"[A-Za-z0-9_.-]+@[A-Za-z0-9_.-]+", s):
        raise ValueError("expected an Erlang node name, NAME@HOST (e.g. rabbit@mq1)")
    return s


def _controllers(v: Any) -> tuple[str, ...]:
    items = v if isinstance(v, list) else str(v).split(",")
    refs = tuple(str(i).strip() for i in items if str(i).strip())
    if not refs:
        raise ValueError("expected MODULE:CLASS[,MODULE:CLASS...]")
    for ref in refs:
        mod, _, cls = ref.partition(":")
        if not mod or not cls:
            raise ValueError(f"{ref!r} is not MODULE:CLASS")
    return refs


def _tiers(v: Any) -> tuple[int, ...]:
    items = v if isinstance(v, list) else str(v).split(",")
    try:
        tiers = tuple(_positive_int(i) for i in items)
    except ValueError:
        raise ValueError("expected comma-separated positive whole seconds") from None
    if not tiers or list(tiers) != sorted(set(tiers)):
        raise ValueError("expected increasing positive whole seconds, e.g. 1,4,16,64")
    if tiers[-1] > MAX_TIER_S:
        raise ValueError(f"expected delay tiers of at most {MAX_TIER_S} seconds (a year and a day)")
    return tiers


def _port(v: Any) -> int:
    if isinstance(v, bool):
        raise ValueError("expected a port number, 0 for none")
    try:
        n = int(v)
    except (TypeError, ValueError):
        raise ValueError("expected a port number, 0 for none") from None
    if not 0 <= n <= 65535 or (isinstance(v, float) and v != n):
        raise ValueError("expected a port number 0-65535, 0 for none")
    return n


def _host(v: Any) -> str:
    s = str(v).strip()
    if not s or any(c in s for c in " /\t\n"):
        raise ValueError("expected an IP address or host name to listen on")
    return s


def _dir(v: Any) -> str:
    path = str(v).strip()
    if not path:
        raise ValueError("expected a directory path")
    return path


def _readable_file(v: Any) -> str:
    path = str(v).strip()
    if not path:
        raise ValueError("expected a file path")
    try:
        with open(path, "rb"):
            return path
    except OSError as exc:
        raise ValueError(f"cannot read it: {exc.strerror}") from None


@dataclass(frozen=True)
class Option:
    name: str
    """Flag without dashes; env var is CTLPOOL_<NAME>; TOML key is the name."""
    group: str | None
    """Settings group attribute (``broker``...) or None for PoolSettings itself."""
    attr: str
    parse: Callable[[Any], Any]
    help: str
    metavar: str | None = None


OPTIONS: tuple[Option, ...] = (
    Option("controllers", None, "controllers", _controllers, "controllers to run, MODULE:CLASS[,MODULE:CLASS...]", "REFS"),
    Option("workers", None, "workers", _int_in(1, MAX_WORKERS), f"worker processes, 1-{MAX_WORKERS} (default: usable CPUs)", "N"),
    Option("pin", None, "pin", _pin, "pin workers to CPUs: auto (default: unless the broker runs on this host), true or false; --no-pin = false", "MODE"),
    Option("node-id", None, "node_id", _name, "this host's member name (default: hostname)", "ID"),
    Option("weight", None, "weight", _number_upto(MAX_WEIGHT), f"relative share of partitions per worker, more than 0 and at most {MAX_WEIGHT:g} (default 1)", "W"),
    Option("log-format", None, "log_format", _choice("json", "text"), "json (default) or text", "FMT"),
    Option("log-level", None, "log_level", _choice("debug", "info", "warning", "error"), "debug|info|warning|error", "LEVEL"),
    Option("metrics-port", None, "metrics_port", _port, "serve /metrics, /livez, /readyz on this port (default 0: off; 9464 is usual)", "PORT"),
    Option("metrics-host", None, "metrics_host", _host, "address of the metrics endpoint (default 127.0.0.1)", "ADDR"),
    Option("state-dir", None, "state_dir", _dir, "in-flight journals and the node-id lock, private to this user (default $RUNTIME_DIRECTORY, $XDG_RUNTIME_DIR/ctlpool or a temp dir)", "DIR"),
    Option("amqp-url", "broker", "amqp_url", parse_urls, "broker URL; prefer CTLPOOL_AMQP_URL or --amqp-url-file so the password stays off the command line", "URL"),
    Option("amqp-url-file", "broker", "amqp_url", read_url_file, "read the broker URL from this file (systemd credentials)", "FILE"),
    Option("prefix", "broker", "prefix", _name, "exchange/queue name prefix (default ctl)", "NAME"),
    Option("admin-node", "broker", "admin_node", _erlang_node, "status, doctor: the RabbitMQ node rabbitmqctl asks for queue leaders and replicas (needs the cluster's Erlang cookie; default: this host's)", "NODE"),
    Option("tls-ca-file", "broker", "tls_ca_file", _readable_file, "amqps://: CA bundle (PEM) to verify the broker with (default: system CAs)", "FILE"),
    Option("tls-cert-file", "broker", "tls_cert_file", _readable_file, "amqps://: client certificate (PEM) for brokers that require one", "FILE"),
    Option("tls-key-file", "broker", "tls_key_file", _readable_file, "amqps://: private key (PEM) of --tls-cert-file, if a separate file", "FILE"),
    Option("heartbeat-s", "broker", "heartbeat_s", _int_in(1, MAX_U16, " (a 16-bit AMQP field)"), "AMQP heartbeat seconds, 1-65535 (default 20)", "S"),
    Option("partitions", "topology", "partitions", _int_in(1, MAX_PARTITIONS), f"partition queues of a new controller, 1-{MAX_PARTITIONS} (a live one keeps its count: change it with ctlpool topology resize; default 16)", "P"),
    Option("queue-type", "topology", "queue_type", _choice("quorum", "classic"), "quorum (default) or classic", "TYPE"),
    Option("tiers-s", "topology", "tiers_s", _tiers, "delay tier TTLs in seconds (default 1,4,16,64,256,1024)", "LIST"),
    Option("queue-replicas", "topology", "replicas", _int_in(0, 255), "replicas of each quorum queue on a cluster, fixed when declared (default 0: the broker's, 3)", "N"),
    Option("max-deliveries", "topology", "max_deliveries", _int_in(1, MAX_DELIVERIES, f" (half the broker's delivery limit, {BROKER_DELIVERY_LIMIT})"),
           f"park a message after this many unacked deliveries, 1-{MAX_DELIVERIES} (default 3)", "N"),
    Option("prefetch", "worker", "prefetch", _int_in(1, MAX_U16, " (a 16-bit AMQP field)"), "unacked deliveries per partition consumer, 1-65535 (default 50)", "N"),
    Option("concurrency", "worker", "concurrency", _int_in(1, MAX_CONCURRENCY), f"reconciles in flight per worker, 1-{MAX_CONCURRENCY} (default 64)", "N"),
    Option("reconcile-timeout-s", "worker", "reconcile_timeout_s", seconds(), "per-reconcile timeout, at most a day (default 300)", "S"),
    Option("drain-timeout-s", "worker", "drain_timeout_s", seconds(), "time in-flight work gets on SIGTERM, at most a day (default 60)", "S"),
    Option("reroute-on-acquire", "worker", "reroute_on_acquire", _bool, "ring-drift guard (default true; false only on RabbitMQ >= 4.3)", "BOOL"),
    Option("heartbeat-interval-s", "worker", "heartbeat_interval_s", seconds(MIN_HEARTBEAT_INTERVAL_S),
           f"membership heartbeat period, {MIN_HEARTBEAT_INTERVAL_S:g}-{MAX_SECONDS:g} (default 1)", "S"),
    Option("member-timeout-s", "worker", "member_timeout_s", seconds(),
           f"a member silent this long is gone; at least {MEMBER_TIMEOUT_HEARTBEATS}x --heartbeat-interval-s (default 5)", "S"),
)

ENV_PREFIX = "CTLPOOL_"


def env_name(opt: Option) -> str:
    return ENV_PREFIX + opt.name.upper().replace("-", "_")


def load_toml(path: str) -> dict[str, Any]:
    """Read a TOML config file; keys may use dashes or underscores. A ``[ctlpool]`` table is accepted too."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"--config: cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--config: {path} is not valid TOML: {exc}") from None
    if isinstance(data.get("ctlpool"), dict):
        data = data["ctlpool"]
    known = {o.name for o in OPTIONS} | {o.name.replace("-", "_") for o in OPTIONS}
    for key in data:
        if key not in known:
            raise ConfigError(f"--config: unknown key {key!r} in {path}")
    return {k.replace("_", "-"): v for k, v in data.items()}


def resolve(
    flags: Mapping[str, Any],
    env: Mapping[str, str] | None = None,
    file_values: Mapping[str, Any] | None = None,
    only: frozenset[str] | None = None,
) -> PoolSettings:
    """Build settings: per option, flag (not None) > env > file > default.

    ``flags`` maps option names (``node-id``) to raw values or None; ``only`` limits which
    options are read (a subcommand that has no ``--workers`` ignores CTLPOOL_WORKERS).
    """
    env = os.environ if env is None else env
    file_values = file_values or {}
    groups: dict[str | None, dict[str, Any]] = {None: {}, "broker": {}, "topology": {}, "worker": {}}
    for opt in OPTIONS:
        if only is not None and opt.name not in only:
            continue
        for source, raw in (
            (f"--{opt.name}", flags.get(opt.name)),
            (env_name(opt), env.get(env_name(opt)) or None),  # an empty variable is unset, as in a shell
            (f"{opt.name} in the config file", file_values.get(opt.name)),
        ):
            if raw is None:
                continue
            try:
                value = opt.parse(raw)
            except ValueError as exc:
                where = "" if source.startswith("--") else f" (from {source})"
                shown = redact_url(str(raw)) if opt.parse is parse_urls else str(raw)  # errors reach the journal
                raise ConfigError(f"--{opt.name}{where}: {exc}, got {shown[:80]!r}") from None
            if opt.attr in groups[opt.group] and opt.name.endswith("-file"):
                break  # --amqp-url, from any source, wins over --amqp-url-file
            groups[opt.group][opt.attr] = value
            break
    settings = PoolSettings(
        broker=BrokerSettings(**groups["broker"]),
        topology=TopologySettings(**groups["topology"]),
        worker=WorkerSettings(**groups["worker"]),
        **groups[None],
    )
    _check_together(settings.worker)
    return settings


def _check_together(w: WorkerSettings) -> None:
    """Settings that are each valid but not with each other."""
    if w.member_timeout_s < MEMBER_TIMEOUT_HEARTBEATS * w.heartbeat_interval_s:
        raise ConfigError(f"--member-timeout-s: must be at least {MEMBER_TIMEOUT_HEARTBEATS}x --heartbeat-interval-s "
                          f"({w.heartbeat_interval_s:g}), or a live member is dropped between two heartbeats; "
                          f"got {w.member_timeout_s:g}")
