"""ctlpool: Kubernetes-style controllers on CPU-pinned workers fed by durable RabbitMQ queues.

The public API a controller author needs::

    from pool import Controller, Result, Permanent, RetryPolicy, Publisher
"""

from .controller import Context, Controller, Event, Result
from .errors import (
    BrokerError,
    BrokerUnavailable,
    ConfigError,
    CtlpoolError,
    Nacked,
    Permanent,
    PluginMissing,
    PublishError,
    TopologyMismatch,
    Unroutable,
)
from .publisher import BlockingPublisher, Publisher
from .retries import RetryPolicy

__all__ = [
    "BlockingPublisher",
    "BrokerError",
    "BrokerUnavailable",
    "ConfigError",
    "Context",
    "Controller",
    "CtlpoolError",
    "Event",
    "Nacked",
    "Permanent",
    "PluginMissing",
    "PublishError",
    "Publisher",
    "Result",
    "RetryPolicy",
    "TopologyMismatch",
    "Unroutable",
]
