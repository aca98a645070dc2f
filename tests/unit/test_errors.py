"""How broker errors are classified: the missing consistent-hash plugin must say what to run."""

from __future__ import annotations

import pytest

from pool.amqp import ChannelGone, plugin_error_or
from pool.errors import PluginMissing


@pytest.mark.parametrize("text", ["503 COMMAND_INVALID - unknown exchange type 'x-consistent-hash'"])
def test_the_brokers_answer_without_the_plugin_is_recognised(text):
    # Given the error RabbitMQ 3.10 gives for an exchange type it does not know
    # When the topology code classifies it
    err = plugin_error_or(ChannelGone(503, text.split(" ", 1)[1]))
    # Then it is PluginMissing, whose message is the command to run
    assert isinstance(err, PluginMissing)
    assert "rabbitmq-plugins enable rabbitmq_consistent_hash_exchange" in str(err)
    # and another 503 is not mistaken for it
    assert not isinstance(plugin_error_or(ChannelGone(503, "COMMAND_INVALID - something else")), PluginMissing)
