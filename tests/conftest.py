"""Shared fixtures. Broker tests use the local RabbitMQ (CTLPOOL_TEST_AMQP_URL) and a fresh,
uniquely named topology per test (its own prefix), deleted afterwards."""

from __future__ import annotations

import os
import uuid

import pytest

AMQP_URL = os.environ.get("CTLPOOL_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")


@pytest.fixture(scope="session")
def amqp_url() -> str:
    """The broker must be there: a missing broker fails every broker test (never skips)."""
    import pika

    try:
        pika.BlockingConnection(pika.URLParameters(AMQP_URL)).close()
    except Exception as exc:  # noqa: BLE001 - any failure means: no usable broker
        pytest.fail(f"RabbitMQ not reachable at {AMQP_URL}: {exc!r}; run: rabbitmq-server -detached", pytrace=False)
    return AMQP_URL


@pytest.fixture
def prefix(amqp_url: str):
    """A unique name prefix; every exchange and queue under it is deleted after the test."""
    p = f"t{uuid.uuid4().hex[:10]}"
    yield p
    from tests.helpers import delete_prefix

    delete_prefix(amqp_url, p)
