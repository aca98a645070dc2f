"""What every ``ctlpool`` command shares: the flag sets, the parser class, settings from flags, env
and TOML, and printing what came from outside safely.

Data flow: ``build_parser`` (in ``pool.cli``) adds each command's flags from
``pool.settings.OPTIONS`` with ``add_options``; a command turns its parsed arguments into
settings with ``settings_from``, and prints through ``fail`` / ``to_json``, which escape.
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import PackageNotFoundError, version
from typing import Any, NoReturn

import orjson

from ..errors import ConfigError
from ..settings import OPTIONS, PoolSettings, load_toml, resolve
from ..text import escape, json_safe
from ..exits import EXIT_CONFIG

BROKER_OPTS = frozenset({"amqp-url", "amqp-url-file", "tls-ca-file", "tls-cert-file", "tls-key-file", "prefix",
                         "heartbeat-s", "log-format", "log-level"})
TOPOLOGY_OPTS = BROKER_OPTS | {"partitions", "queue-type", "tiers-s", "queue-replicas"}
STATUS_OPTS = TOPOLOGY_OPTS | {"admin-node"}
DOCTOR_OPTS = BROKER_OPTS | {"admin-node"}
RUN_OPTS = frozenset(o.name for o in OPTIONS) - {"admin-node"}
PARKED_ACTIONS = ("list", "show", "replay", "purge")
START_BROKER_HINT = "start it with: rabbitmq-server -detached  (or: systemctl start rabbitmq-server)"
PUBLISH_RETRY_S = 60.0  # publish --batch: how long it keeps re-sending with no confirm from the broker


def version_text() -> str:
    try:
        return version("ctlpool")
    except PackageNotFoundError:  # running from a source tree
        return "0+unknown"


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_CONFIG, f"{self.prog}: error: {escape(message)}\n")


def arg(parse: Any) -> Any:
    """An argparse ``type`` from a settings parser: its reason, and the value, in argparse's one line."""
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{exc}, got {text!r}") from None
    return convert


def add_options(p: argparse.ArgumentParser, names: frozenset[str]) -> None:
    for opt in OPTIONS:
        if opt.name in names:
            p.add_argument(f"--{opt.name}", dest=opt.name, default=None, metavar=opt.metavar, help=opt.help)
    if "pin" in names:
        p.add_argument("--no-pin", dest="pin", action="store_const", const="false", help="do not pin workers to CPUs")
    p.add_argument("--config", metavar="FILE.toml", help="TOML file with settings (flags and CTLPOOL_* win over it)")


def positive(text: str) -> int:
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

    from ..tls import use_tls

    b = settings.broker
    files = (b.tls_ca_file, b.tls_cert_file, b.tls_key_file)
    if not any(files):
        return
    if urlsplit(b.amqp_url).scheme != "amqps":
        raise ConfigError("--tls-ca-file/--tls-cert-file/--tls-key-file: need an amqps:// broker URL")
    use_tls(*files)


def fail(code: int, message: str) -> int:
    print(f"ctlpool: {escape(message)}", file=sys.stderr)
    return code


def to_json(value: Any) -> str:
    return json_safe(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode())


def ask(question: str) -> str:
    try:
        return input(question)
    except EOFError:
        return ""


