"""``ctlpool run``: declare the topology (waiting for a broker that is not up yet), then supervise.

Data flow: flags -> ``PoolSettings`` -> ``pool.topology.ensure`` (retried while the broker is
unreachable) -> ``pool.supervisor.Supervisor.run``, whose exit code is the command's.
"""

from __future__ import annotations

import argparse
import asyncio
import logging

from ..errors import BrokerUnavailable, ConfigError
from ..notify import Notifier
from ..settings import PoolSettings
from .common import RUN_OPTS, START_BROKER_HINT, settings_from

log = logging.getLogger("ctlpool.cli")


def cmd_run(args: argparse.Namespace) -> int:
    from ..controller import load_controller
    from ..logs import configure
    from ..supervisor import Supervisor

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

    from .. import topology

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


