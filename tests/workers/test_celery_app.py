"""The torch-free side the API uses: the app's delivery settings, enqueue_job, broker_ping."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
import redis

from app.settings import Settings
from tests.workers.conftest import REDIS_URL
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


def test_unreachable_broker_fails_fast_with_broker_unavailable(tmp_path):
    url = f"redis://127.0.0.1:{_closed_port()}/0"
    app = create_app(Settings(home=tmp_path, broker_url=url))
    for call in (lambda: enqueue_job("job-1", app=app), lambda: broker_ping(1.0, app=app)):
        start = time.monotonic()
        with pytest.raises(BrokerUnavailable, match="not reachable"):
            call()
        assert time.monotonic() - start < 3


def test_ping_gives_up_on_a_broker_that_never_answers(tmp_path):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        accepted: list[socket.socket] = []
        threading.Thread(target=lambda: accepted.append(server.accept()[0]), daemon=True).start()
        url = f"redis://127.0.0.1:{server.getsockname()[1]}/0"
        app = create_app(Settings(home=tmp_path, broker_url=url))
        start = time.monotonic()
        with pytest.raises(BrokerUnavailable):
            broker_ping(0.5, app=app)
        assert time.monotonic() - start < 3
        for connection in accepted:
            connection.close()
