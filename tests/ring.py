"""A consistent-hash exchange over quorum queues bound once, in order, weight "1" (the setup of
DESIGN fact 1), and where each key lands when published through a given node: what the ring
tests on the single broker and on the local cluster measure."""

from __future__ import annotations

import pika

from tests.helpers import delete


class Ring:
    def __init__(self, url: str, prefix: str, queues: int) -> None:
        self.exchange = f"{prefix}.ring"
        self.queues = [f"{prefix}.ring.q{i:02d}" for i in range(queues)]
        conn = pika.BlockingConnection(pika.URLParameters(url))
        ch = conn.channel()
        ch.exchange_declare(self.exchange, "x-consistent-hash", durable=True)
        for q in self.queues:
            ch.queue_declare(q, durable=True, arguments={"x-queue-type": "quorum"})
            ch.queue_bind(q, self.exchange, "1")
        conn.close()

    def route(self, url: str, keys: list[str]) -> dict[str, str]:
        """Publish ``keys`` through ``url``'s node; key -> the queue it landed in (taken out again)."""
        conn = pika.BlockingConnection(pika.URLParameters(url))
        ch = conn.channel()
        ch.confirm_delivery()
        for k in keys:
            ch.basic_publish(self.exchange, k, b"", mandatory=True)
        where = {}
        for q in self.queues:
            while (got := ch.basic_get(q, auto_ack=True))[0] is not None:
                where[got[0].routing_key] = q
        conn.close()
        return where

    def delete(self, url: str) -> None:
        delete(url, self.queues, [self.exchange])
