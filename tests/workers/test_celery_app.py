"""The torch-free side the API uses: the app's delivery settings, enqueue_job, broker_ping."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator

import pytest
import redis

from app.settings import Settings
from tests.workers.conftest import REDIS_URL
from workers import celery_app
from workers.celery_app import (
    RUN_JOB,
    BrokerUnavailable,
    Queue,
    broker_ping,
    create_app,
    enqueue_job,
)


def test_importing_the_api_side_loads_neither_torch_nor_the_edit_code():
    code = (
        "import sys, workers, workers.celery_app, workers.errors, app.job_spec; "
        "bad = {'torch', 'app.ml.dinm', 'transformers'} & set(sys.modules); "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_delivery_settings(tmp_path):
    settings = Settings(
        home=tmp_path,
        broker_url=REDIS_URL,
        job_soft_time_limit_s=60,
        job_time_limit_s=90,
        broker_visibility_timeout_s=100,
    )
    conf = create_app(settings).conf
    assert conf.task_acks_late and conf.task_reject_on_worker_lost and conf.task_ignore_result
    assert conf.worker_prefetch_multiplier == 1
    assert (conf.task_soft_time_limit, conf.task_time_limit) == (60, 90)
    assert conf.broker_transport_options["visibility_timeout"] == 100
    assert conf.task_routes[RUN_JOB] == {"queue": "edits"}
    assert [q.value for q in Queue] == ["edits", "light"]


def test_time_limits_must_be_ordered():
    with pytest.raises(ValueError, match="job_time_limit_s"):
        Settings(job_soft_time_limit_s=100, job_time_limit_s=50)
    with pytest.raises(ValueError, match="visibility"):
        Settings(job_time_limit_s=5000, broker_visibility_timeout_s=4000)


@pytest.fixture
def redis_db5() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


def test_enqueue_sends_the_job_id_by_task_name_to_the_edits_queue(tmp_path, redis_db5):
    app = create_app(Settings(home=tmp_path, broker_url=REDIS_URL))
    enqueue_job("job-1", app=app)
    broker_ping(1.0, app=app)
    (raw,) = redis_db5.lrange("edits", 0, -1)
    message = json.loads(raw)
    assert message["headers"]["task"] == RUN_JOB
    assert message["headers"]["argsrepr"] == "['job-1']"


def test_enqueue_on_the_embedded_broker_writes_under_home(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    home = tmp_path / "home"
    app = create_app(Settings(home=home))
    enqueue_job("job-1", app=app)
    broker_ping(1.0, app=app)
    (message,) = (home / "broker" / "queue").iterdir()
    assert message.name.endswith(".edits.msg")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]  # nothing in the cwd


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _returns(call: Callable[[], object]) -> None:
    """Run `call` on a thread and do as it did (return or raise); fail if it never ends.

    The 60 s are a guard against hanging, not a speed limit: every call here either gives up by
    itself within about a second or would wait forever (or for an hour), so the guard tells the
    two apart however loaded the machine is.
    """
    outcome: list[BaseException | None] = []
    done = threading.Event()

    def target() -> None:
        try:
            call()
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)
        done.set()

    threading.Thread(target=target, daemon=True).start()
    assert done.wait(60), "still waiting for the broker: the call never gave up"
    if outcome[0] is not None:
        raise outcome[0]


@pytest.fixture
def dropping_broker() -> Iterator[tuple[str, list[socket.socket]]]:
    """A Redis URL whose server closes each connection as it accepts it, and those connections."""
    accepted: list[socket.socket] = []
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)

        def serve() -> None:
            while True:
                try:
                    connection = server.accept()[0]
                except OSError:  # the listening socket is closed: the test is over
                    return
                accepted.append(connection)  # listed before the close the client then sees
                connection.close()

        threading.Thread(target=serve, daemon=True).start()
        yield f"redis://127.0.0.1:{server.getsockname()[1]}/0", accepted
        server.shutdown(socket.SHUT_RDWR)  # wakes the accept


def test_unreachable_broker_fails_fast_with_broker_unavailable(tmp_path):
    # A refused connection fails at once: these calls end unless they wait or retry without end
    # (how many times they try is counted by the next test, where it can be).
    url = f"redis://127.0.0.1:{_closed_port()}/0"
    app = create_app(Settings(home=tmp_path, broker_url=url))
    for call in (lambda: enqueue_job("job-1", app=app), lambda: broker_ping(1.0, app=app)):
        with pytest.raises(BrokerUnavailable, match="not reachable"):
            _returns(call)


def test_a_broker_that_drops_connections_is_not_retried(tmp_path, dropping_broker):
    # Counted, where a refused connection cannot be: each attempt is one accepted connection.
    url, accepted = dropping_broker
    app = create_app(Settings(home=tmp_path, broker_url=url))
    with pytest.raises(BrokerUnavailable, match="not reachable"):
        _returns(lambda: enqueue_job("job-1", app=app))
    assert len(accepted) == 1  # publishing: one attempt, no retry
    accepted.clear()
    with pytest.raises(BrokerUnavailable, match="not reachable"):
        _returns(lambda: broker_ping(1.0, app=app))
    assert 1 <= len(accepted) <= 2  # the ping: at most one retry


def test_ping_gives_up_on_a_broker_that_never_answers(tmp_path, monkeypatch):
    # The app's own socket timeout becomes an hour, so only the ping's timeout can end its wait.
    monkeypatch.setattr(celery_app, "REDIS_SOCKET_TIMEOUT_S", 3600.0)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        accepted: list[socket.socket] = []
        connected = threading.Event()

        def serve() -> None:
            accepted.append(server.accept()[0])  # and never answers
            connected.set()

        threading.Thread(target=serve, daemon=True).start()
        url = f"redis://127.0.0.1:{server.getsockname()[1]}/0"
        app = create_app(Settings(home=tmp_path, broker_url=url))
        with pytest.raises(BrokerUnavailable):
            _returns(lambda: broker_ping(0.5, app=app))
        assert connected.wait(60)  # it reached the server, which held the connection silently
        for connection in accepted:
            connection.close()
