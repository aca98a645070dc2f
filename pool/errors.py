"""The exception tree. The type of an exception tells the pool what to do.

    CtlpoolError                 base of everything the pool raises itself
    ├── ConfigError              bad flag, env var or TOML key; the CLI exits 2 naming it
    ├── BrokerError              talking to RabbitMQ went wrong
    │   ├── BrokerUnavailable    cannot connect (refused, DNS, auth); says where it tried
    │   ├── PluginMissing        rabbitmq_consistent_hash_exchange is off; says how to enable it
    │   ├── TopologyMismatch     what exists on the broker disagrees with the configuration
    │   └── PublishError         a publish was not confirmed
    │       ├── Unroutable       basic.return: no queue took it (312 NO_ROUTE)
    │       └── Nacked           basic.nack: the broker refused it
    └── Permanent                raised by a reconcile: park the event now, never retry

    BaseException
    └── LoopBlocked              raised *into* a reconcile step that held the event loop nearly
                                 as long as the lease (``pool.blocker``): blamed like a death,
                                 retried through the delay tiers, parked at --max-deliveries

Any other exception raised by a reconcile means "retry with backoff" (see
``pool.retries``); a reconcile never retries by itself.
"""

from __future__ import annotations


class CtlpoolError(Exception):
    """Base of every error raised by ctlpool itself."""


class ConfigError(CtlpoolError):
    """An invalid setting. ``str()`` names the flag and the value."""


class BrokerError(CtlpoolError):
    """Something went wrong talking to RabbitMQ."""


class BrokerUnavailable(BrokerError):
    """The broker cannot be reached or refused the login."""


class PluginMissing(BrokerError):
    """The consistent-hash exchange plugin is not enabled."""

    ENABLE_COMMAND = "rabbitmq-plugins enable rabbitmq_consistent_hash_exchange"

    def __init__(self) -> None:
        super().__init__(
            "the RabbitMQ plugin rabbitmq_consistent_hash_exchange is not enabled; "
            f"enable it with: {self.ENABLE_COMMAND}  (no broker restart needed)"
        )


class TopologyMismatch(BrokerError):
    """Declared topology on the broker differs from the configuration."""


class PublishError(BrokerError):
    """A publish was not confirmed by the broker."""


class Unroutable(PublishError):
    """The broker returned the message: no queue is bound for it."""


class Nacked(PublishError):
    """The broker nacked the message (e.g. a queue refused it)."""


class Permanent(CtlpoolError):
    """Raised by a reconcile: this event can never succeed; park it with this message."""


class LoopBlocked(BaseException):
    """Raised into a reconcile step that blocked the event loop ``seconds`` (``pool.blocker``).

    A ``BaseException``, like ``CancelledError``, so ``except Exception`` in a reconcile lets it through.
    """

    def __init__(self, seconds: float) -> None:
        super().__init__(f"a reconcile step held the event loop for {seconds:.1f}s and was interrupted before "
                         "the worker's lease ran out")
        self.seconds = seconds
