"""The broker's Redis channel keeps one client object (worker/celery_app.py): kombu built a new
``redis.Redis`` for every message received, acknowledged or sent."""

from __future__ import annotations

from kombu import Connection

import worker.celery_app  # noqa: F401  (installs the patch, as in every worker)


def test_a_channel_reuses_one_redis_client_and_it_works(redis_url: str) -> None:
    with Connection(redis_url) as connection:
        channel = connection.default_channel
        with channel.conn_or_acquire() as first, channel.conn_or_acquire() as second:
            assert first is second
        assert first.ping()
        channel._pool = None  # a reconnect: a new pool gets a new client
        with channel.conn_or_acquire() as third:
            assert third is not first
            assert third.ping()
        queue = connection.SimpleQueue("callq-test-reuse")
        try:
            queue.put({"n": 1})
            message = queue.get(timeout=10)
            message.ack()
            assert message.payload == {"n": 1}
        finally:
            queue.clear()
            queue.close()
