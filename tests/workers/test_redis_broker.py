"""The Redis broker's transport: an undecodable message is skipped, and the next delivered."""

from __future__ import annotations

import logging

import pytest
import redis

from app.settings import Settings
from tests.workers.conftest import REDIS_URL
from workers.celery_app import REDIS_TRANSPORT, create_app


@pytest.fixture
def client():
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


def test_an_undecodable_message_is_skipped_and_the_next_one_delivered(tmp_path, client, caplog):
    app = create_app(Settings(home=tmp_path, broker_url=REDIS_URL))
    assert app.conf.broker_transport == REDIS_TRANSPORT
    with app.connection_for_write() as conn, conn.SimpleQueue("edits") as queue:
        client.lpush("edits", b'{"body": ')  # read first: the list is read from its right end
        queue.put({"n": 1})
        with caplog.at_level(logging.ERROR, logger="workers.redis_broker"):
            assert queue.get(timeout=5).payload == {"n": 1}
    assert "skipped an undecodable broker message" in caplog.text and '{"body": ' in caplog.text
