"""What a worker tells its supervisor on the status pipe: typed messages, one leading byte each.

Data flow: worker ``on_state(WorkerState.READY)`` -> ``encode_state`` -> pipe -> the
supervisor's ``decode`` -> ``WorkerState``; every ``metrics.REPORT_INTERVAL_S`` the worker's
``MetricsReporter`` sends ``encode_metrics(snapshot)`` the same way, which ``decode`` returns
as ``Metrics``. Both double as the worker's heartbeat (the supervisor feeds systemd's watchdog
on them). Anything else on the pipe decodes to ``None`` and is ignored.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class WorkerState(enum.Enum):
    """A worker's life, as its supervisor sees it."""

    READY = "ready"
    """Consuming every partition it should own."""
    RECONNECTING = "reconnecting"
    """Between broker sessions (backing off)."""
    DRAINING = "draining"
    """Stopping: finishing in-flight work, releasing partitions."""
    STOPPED = "stopped"
    """Done; the process exits."""


@dataclass(frozen=True, slots=True)
class Metrics:
    """A ``WorkerMetrics.encode()`` snapshot."""

    payload: bytes


_STATE = b"s"
_METRICS = b"m"
_STATES = {s.value.encode(): s for s in WorkerState}


def encode_state(state: WorkerState) -> bytes:
    return _STATE + state.value.encode()


def encode_metrics(payload: bytes) -> bytes:
    return _METRICS + payload


def decode(message: bytes) -> WorkerState | Metrics | None:
    tag, body = message[:1], message[1:]
    if tag == _METRICS:
        return Metrics(body)
    if tag == _STATE:
        return _STATES.get(body)
    return None
