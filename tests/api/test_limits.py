"""Limits: request body size, per-key rate (in-process and shared through Redis), active jobs per
key, prompt length and the serving engine's capacity. Each refusal is a 4xx/503 in the error
envelope, with `Retry-After` where waiting helps; never a 500."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from app.api.ratelimit import LocalLimiter, RedisLimiter
from app.settings import Settings
from tests.api.conftest import REDIS_URL, assert_error, closed_port, dinm_body, make_tiny_app
from tests.api.serving_app import live_server
from tests.api.test_auth import new_key
from tests.services import AUTH


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def base_settings(store_engine: Engine, tmp_path: Path) -> Settings:
    url = store_engine.url.render_as_string(hide_password=False)
    return Settings(home=tmp_path / "home", database_url=url, broker_url=REDIS_URL, device="cpu")


@pytest.fixture
def app_with(base_settings, session_factory, redis_queue) -> Iterator[Any]:
    clients: list[TestClient] = []

    def make(**overrides: Any) -> TestClient:
        client = TestClient(make_tiny_app(base_settings.model_copy(update=overrides)))
        clients.append(client.__enter__())
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


# -- request bodies ------------------------------------------------------------------------------


def test_a_declared_body_over_the_limit_is_413_before_it_is_read(app_with):
    client = app_with(max_request_bytes=2048)
    body = dinm_body(name="x" * 3000)
    error = assert_error(client.post("/v1/jobs", json=body, headers=AUTH), 413)
    assert error["code"] == "request_too_large" and "2,048" in error["message"]
    small = client.post("/v1/jobs", json=dinm_body(), headers=AUTH)
    assert small.status_code == 202, small.text


def test_a_streamed_body_without_length_is_cut_at_the_limit(app_with):
    client = app_with(max_request_bytes=2048)

    def chunks() -> Iterator[bytes]:
        yield b'{"kind": "dinm", "name": "'
        for _ in range(10):
            yield b"y" * 500
        yield b'"}'

    response = client.post(
        "/v1/jobs", content=chunks(), headers=AUTH | {"Content-Type": "application/json"}
    )
    assert assert_error(response, 413)["code"] == "request_too_large"


def test_corpus_uploads_have_their_own_larger_limit(app_with):
    client = app_with(max_request_bytes=2048, corpus_max_bytes=64 * 1024)
    corpus = "".join(f'{{"text": "document number {i} is fine"}}\n' for i in range(200))
    assert len(corpus) > 2048
    response = client.post(
        "/v1/corpora", content=corpus, headers=AUTH | {"Content-Type": "application/x-ndjson"}
    )
    assert response.status_code == 201, response.text
    assert response.json()["documents"] == 200


# -- rate limits ---------------------------------------------------------------------------------


def test_a_key_over_its_rate_gets_429_with_retry_after_and_others_do_not(app_with):
    client = app_with(rate_limit_per_minute=6, rate_limit_burst=3)
    reader = new_key(client, "reader", "busy")["key"]
    other = new_key(client, "reader", "calm")["key"]
    statuses = [client.get("/v1/versions", headers=auth(reader)).status_code for _ in range(3)]
    assert statuses == [200, 200, 200]
    limited = client.get("/v1/versions", headers=auth(reader))
    error = assert_error(limited, 429)
    assert error["code"] == "rate_limited" and error["type"] == "rate_limit_error"
    assert 1 <= int(limited.headers["Retry-After"]) <= 11  # one request per 10 s
    assert client.get("/v1/versions", headers=auth(other)).status_code == 200


def test_two_api_processes_share_a_keys_budget_through_redis(app_with):
    first = app_with(rate_limit_per_minute=6, rate_limit_burst=2)
    second = app_with(rate_limit_per_minute=6, rate_limit_burst=2)
    key = new_key(first, "reader")["key"]
    assert first.get("/v1/versions", headers=auth(key)).status_code == 200
    assert second.get("/v1/versions", headers=auth(key)).status_code == 200
    assert_error(first.get("/v1/versions", headers=auth(key)), 429)
    assert_error(second.get("/v1/versions", headers=auth(key)), 429)


def test_the_gcra_refills_at_the_rate():
    limiter = LocalLimiter(per_minute=60, burst=2)  # one a second, two at once
    assert limiter.acquire("k") == 0 and limiter.acquire("k") == 0
    wait = limiter.acquire("k")
    assert 0 < wait <= 1.0
    limiter._tat["k"] -= 1.0  # a second passes
    assert limiter.acquire("k") == 0
    assert limiter.acquire("other") == 0


def test_redis_down_falls_back_to_local_limits():
    limiter = RedisLimiter(f"redis://127.0.0.1:{closed_port()}/0", per_minute=60, burst=1)
    assert limiter.acquire("k") == 0  # answered, not raised, though Redis is away
    assert limiter.acquire("k") > 0  # and still limited, in-process


def test_redis_limits_across_limiters():
    redis.Redis.from_url(REDIS_URL).delete("detox:ratelimit:shared")
    one, two = (RedisLimiter(REDIS_URL, per_minute=60, burst=2) for _ in range(2))
    assert one.acquire("shared") == 0 and two.acquire("shared") == 0
    assert one.acquire("shared") > 0 and two.acquire("shared") > 0


# -- jobs per key --------------------------------------------------------------------------------


def test_active_jobs_per_key_are_capped(app_with):
    client = app_with(max_active_jobs_per_key=2)
    editor = new_key(client, "editor")["key"]
    for _ in range(2):
        assert client.post("/v1/jobs", json=dinm_body(), headers=auth(editor)).status_code == 202
    refused = client.post("/v1/jobs", json=dinm_body(), headers=auth(editor))
    error = assert_error(refused, 429)
    assert error["code"] == "too_many_active_jobs" and refused.headers["Retry-After"]
    other = new_key(client, "editor", "other")["key"]
    assert client.post("/v1/jobs", json=dinm_body(), headers=auth(other)).status_code == 202
    # A finished job no longer counts.
    first = client.get("/v1/jobs", headers=AUTH).json()["data"][-1]
    assert client.post(f"/v1/jobs/{first['id']}/cancel", headers=AUTH).status_code == 200
    assert client.post("/v1/jobs", json=dinm_body(), headers=auth(editor)).status_code == 202


# -- generation ----------------------------------------------------------------------------------


def test_a_prompt_over_the_token_limit_is_413(tmp_path):
    with live_server(tmp_path, serving_max_prompt_tokens=8) as (url, _app):
        body = {"model": "base", "prompt": "one two three four five six seven eight nine ten"}
        response = httpx.post(f"{url}/v1/completions", json=body, headers=AUTH, timeout=30)
        error = assert_error(response, 413, param="prompt")
        assert error["code"] == "prompt_too_large"
        ok = httpx.post(f"{url}/v1/completions", json=body | {"prompt": "hi"}, headers=AUTH,
                        timeout=30)  # fmt: skip
        assert ok.status_code == 200


def test_a_full_engine_answers_503_with_retry_after_at_once(tmp_path):
    # Requests wait up to 1 s for a batch to fill, so the first two hold both slots while the
    # rest arrive: those are refused at once, and every request is answered.
    with live_server(tmp_path, serving_max_pending=2, serving_max_wait_ms=1000) as (url, _app):
        body = {"model": "base", "prompt": "hi", "max_tokens": 2, "temperature": 0}
        barrier = threading.Barrier(8)

        def post(i: int) -> httpx.Response:
            barrier.wait(timeout=30)
            streaming = {"stream": True} if i % 2 else {}
            return httpx.post(f"{url}/v1/completions", json=body | streaming, headers=AUTH,
                              timeout=60)  # fmt: skip

        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(post, range(8)))
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) <= {200, 503} and statuses.count(200) >= 2 and 503 in statuses
    for response in responses:
        if response.status_code == 503:
            error = assert_error(response, 503)
            assert error["code"] == "overloaded" and response.headers["Retry-After"] == "1"
