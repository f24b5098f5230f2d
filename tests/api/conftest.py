"""The API on a real database (both backends, from tests/conftest.py) and a real Redis broker.

Jobs stay `queued` here: no worker runs. Redis database 6 is flushed before every test, so a test
can count the tasks it enqueued.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from app.api.main import create_app
from app.settings import Settings
from tests.instances import safeedit_instance
from tests.services import AUTH, redis_url
from workers.celery_app import Queue

REDIS_URL = redis_url(6)
ENVELOPE_KEYS = {"message", "type", "param", "code"}


def dinm_body(**overrides: Any) -> dict[str, Any]:
    return {
        "kind": "dinm",
        "parent": "base",
        "instance": safeedit_instance(),
        "params": {"steps": 2, "preset": "contrastive"},
    } | overrides


def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def assert_error(response: Any, status: int, *, param: str | None = None) -> dict[str, Any]:
    """The response is `status` with exactly the error envelope (and `param` when given)."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) - {"checks"} == {"error"}, body
    error = body["error"]
    assert set(error) == ENVELOPE_KEYS, error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    if param is not None:
        assert error["param"] == param, error
    return error


@pytest.fixture
def redis_queue() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    yield client
    client.close()


def queued_tasks(client: redis.Redis) -> int:
    return int(client.llen(Queue.EDITS.value))


@pytest.fixture
def api_settings(store_engine: Engine, tmp_path: Path) -> Settings:
    url = store_engine.url.render_as_string(hide_password=False)
    return Settings(home=tmp_path / "home", database_url=url, broker_url=REDIS_URL)


@pytest.fixture
def api(
    api_settings: Settings, session_factory: Any, redis_queue: redis.Redis
) -> Iterator[TestClient]:
    with TestClient(create_app(api_settings), headers=AUTH) as client:
        yield client


@pytest.fixture
def tiny_settings(store_engine: Engine, tmp_path: Path) -> Settings:
    """The API on the real store and Redis, no rate limit (tests that want one set it)."""
    url = store_engine.url.render_as_string(hide_password=False)
    return Settings(
        home=tmp_path / "home", database_url=url, broker_url=REDIS_URL, device="cpu",
        rate_limit_per_minute=0,
    )  # fmt: skip


def make_tiny_app(settings: Settings) -> FastAPI:
    """The app, generation served by a tiny random model (never the demo model)."""
    from app.serving.engine import Engine as ServingEngine
    from app.serving.factory import build_engine
    from tests.api.serving_app import LengthJudge
    from tests.factories import tiny_model

    lm = tiny_model("llama")

    def factory(sessions: Any) -> ServingEngine:
        return build_engine(settings, sessions, lm=lm, judge_loader=LengthJudge)

    return create_app(settings, engine_factory=factory)


@pytest.fixture
def client(tiny_settings: Settings, session_factory: Any, redis_queue: Any) -> Iterator[TestClient]:
    """A client of the tiny-model app that sends no key unless a request gives one."""
    with TestClient(make_tiny_app(tiny_settings)) as client:
        yield client
