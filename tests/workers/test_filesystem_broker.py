"""The embedded broker's transport: whole messages only, each to exactly one consumer."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from queue import Empty

import pytest
from kombu import Connection

from app.settings import Settings
from workers.celery_app import FILESYSTEM_TRANSPORT, REDIS_TRANSPORT, create_app
from workers.filesystem_broker import PARTIAL_SUFFIX, UNREADABLE_SUFFIX

MESSAGES = 400
CONSUMERS = 3


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(home=tmp_path)


def _connection(settings: Settings) -> Connection:
    """A connection as the app's worker and API make them."""
    return create_app(settings).connection_for_write()


@pytest.fixture
def connection(settings: Settings) -> Iterator[Connection]:
    with _connection(settings) as conn:
        yield conn


def test_the_app_uses_this_transport_for_the_embedded_broker(settings):
    with _connection(settings) as conn:
        assert type(conn.transport).__module__ == FILESYSTEM_TRANSPORT.split(":")[0]
    redis = create_app(Settings(home=settings.home, broker_url="redis://127.0.0.1:6379/5"))
    assert redis.conf.broker_transport == REDIS_TRANSPORT


def test_every_message_reaches_exactly_one_consumer_while_it_is_written(settings):
    """A producer publishes while consumers poll the folder as fast as they can.

    kombu's own transport fails this: a consumer moves a file the producer has created and not
    yet written, reads nothing, and raises a JSON decoding error (Celery then stops the worker).
    """
    received: list[int] = []
    errors: list[BaseException] = []
    done = threading.Event()
    lock = threading.Lock()

    def consume() -> None:
        with _connection(settings) as conn, conn.SimpleQueue("edits", no_ack=True) as queue:
            while True:
                published_all = done.is_set()  # before looking: then an empty queue is final
                try:
                    message = queue.get(block=False)
                except Empty:
                    if published_all:
                        return
                    continue
                except BaseException as exc:  # recorded: the test shows it
                    errors.append(exc)
                    return
                with lock:
                    received.append(message.payload["n"])

    consumers = [threading.Thread(target=consume) for _ in range(CONSUMERS)]
    for thread in consumers:
        thread.start()
    with _connection(settings) as conn, conn.SimpleQueue("edits") as queue:
        for n in range(MESSAGES):
            queue.put({"n": n})
    done.set()
    for thread in consumers:
        thread.join(timeout=60)
    assert not errors, errors
    assert sorted(received) == list(range(MESSAGES))


def test_a_message_being_written_is_invisible_until_renamed(settings, connection):
    queue_folder = settings.broker_folders()["data_folder_in"]
    with connection.SimpleQueue("edits") as queue:
        queue.put({"n": 1})
        (published,) = queue_folder.iterdir()
        partial = published.with_name(published.name + PARTIAL_SUFFIX)
        published.rename(partial)  # as it stands mid-write
        with pytest.raises(Empty):
            queue.get(block=False)
        assert queue.qsize() == 0
        partial.rename(published)
        assert queue.get(block=False).payload == {"n": 1}


def test_an_unreadable_message_is_set_aside_and_the_next_one_delivered(
    settings, connection, caplog
):
    folders = settings.broker_folders()
    cut_short = folders["data_folder_in"] / "00000000000000000000_cut-short.edits.msg"
    cut_short.write_bytes(b'{"body": ')  # as a crash mid-write by another producer leaves it
    with connection.SimpleQueue("edits") as queue:
        queue.put({"n": 2})
        with caplog.at_level(logging.ERROR, logger="workers.filesystem_broker"):
            assert queue.get(block=False).payload == {"n": 2}
    aside = folders["processed_folder"] / (cut_short.name + UNREADABLE_SUFFIX)
    assert aside.read_bytes() == b'{"body": '
    assert str(aside) in caplog.text
    assert list(folders["data_folder_in"].iterdir()) == []


def test_messages_come_in_the_order_sent_and_leave_no_files(settings, connection):
    folders = settings.broker_folders()
    with connection.SimpleQueue("edits") as queue:
        for n in range(50):
            queue.put({"n": n})
        assert queue.qsize() == 50
        assert [queue.get(block=False).payload["n"] for _ in range(50)] == list(range(50))
    assert list(folders["data_folder_in"].iterdir()) == []
    assert list(folders["processed_folder"].iterdir()) == []


def test_two_brokers_in_one_process_keep_their_own_bindings(tmp_path):
    """kombu's record of bindings is per process; a second home must still get its message."""
    for home in (tmp_path / "one", tmp_path / "two"):
        with _connection(Settings(home=home)) as conn, conn.SimpleQueue("edits") as queue:
            queue.put({"home": home.name})
            assert queue.get(block=False).payload == {"home": home.name}
