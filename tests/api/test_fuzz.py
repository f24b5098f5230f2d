"""schemathesis against the live OpenAPI spec of a real server (uvicorn on loopback, SQLite store,
Redis broker, a tiny model): generated requests on every operation, from the schema (positive)
and against it (negative). No answer may be a 500, and every error must be in the
`{"error": {...}}` envelope.

The cases are drawn with Hypothesis directly from each operation's strategy (schemathesis's
pytest plugin does not support this pytest), seeded, so a failure is reproducible.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
import redis
import schemathesis
from hypothesis import HealthCheck, given, seed, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from tests.api.serving_app import live_server
from tests.services import AUTH, redis_url

BROKER = redis_url(11)
ENVELOPE = {"message", "type", "param", "code"}
# Per operation and mode. Drawing the cases (schemathesis canonicalising the schemas), not the
# server, is most of the time: 60 took ~50 s, 30 still reach every operation in both modes.
EXAMPLES = 30


@pytest.fixture(scope="module")
def live_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    redis.Redis.from_url(BROKER).flushdb()
    overrides = {"broker_url": BROKER, "rate_limit_per_minute": 0, "serving_max_tokens": 4}
    with live_server(tmp_path_factory.mktemp("fuzz"), **overrides) as (url, _app):
        yield url
    redis.Redis.from_url(BROKER).flushdb()


def check(case: schemathesis.Case) -> None:
    response = case.call(headers=AUTH, timeout=60)
    where = (case.as_curl_command(), response.status_code, response.text[:400])
    assert response.status_code < 500 or response.status_code == 503, where
    if response.status_code >= 400:
        body = response.json()
        assert set(body) - {"checks"} == {"error"}, where
        assert set(body["error"]) == ENVELOPE, where
        assert isinstance(body["error"]["message"], str) and body["error"]["message"], where


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_server_error_and_every_error_in_the_envelope(live_url, mode):
    schema = schemathesis.openapi.from_url(f"{live_url}/openapi.json", headers=AUTH)
    failures: list[str] = []
    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1

        @seed(1234)
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
                  database=None)  # fmt: skip
        @given(case=operation.as_strategy(generation_mode=mode))
        def fuzz(case: schemathesis.Case) -> None:
            check(case)

        try:
            fuzz()
        except Unsatisfiable:  # no input to get wrong (negative mode, no parameters)
            continue
        except Exception as exc:  # collect every operation's failure, then report them all
            failures.append(f"{operation.method.upper()} {operation.path}: {exc}")
    assert operations >= 20
    assert not failures, "\n\n".join(failures)


# Text that is not valid Unicode (unpaired surrogates, sent as their JSON escapes): 422
# string_unicode naming the field, on every text field that reaches a tokenizer or a judge.
SURROGATES = ["a\ud800b", "\udfff", "end\udbff", "\ud800\ud800", "\udc00\ud800"]
# Valid but hostile text: never a 500.
ODD_TEXTS = ["\x00", "nul\x00in", "\ufffe\uffff", "\U0010ffff", "\u202eevil", "e\u0301" * 50,
             "\x1b[31mred", "\ud83d\ude00"]  # fmt: skip
CHAT = {"model": "base", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
COMPLETION = {"model": "base", "prompt": "Hi", "max_tokens": 2}
AB = {"prompt": "Hi", "arms": ["base", "safe1"], "max_tokens": 2, "judge": True}
AB_CHAT = {"messages": [{"role": "user", "content": "Hi"}], "arms": ["base"], "max_tokens": 2}
TEXT_FIELDS: list[tuple[str, dict, tuple, str]] = [
    ("/v1/chat/completions", CHAT, ("messages", 0, "content"), "messages[0].content"),
    ("/v1/chat/completions", CHAT | {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "Hi"}]}]}, ("messages", 0, "content", 0, "text"),
        "messages[0].content[0].text"),
    ("/v1/chat/completions", CHAT | {"messages": [{"role": "system", "content": "Be nice"},
        {"role": "user", "content": "Hi"}]}, ("messages", 0, "content"), "messages[0].content"),
    ("/v1/chat/completions", CHAT, ("model",), "model"),
    ("/v1/chat/completions", CHAT, ("user",), "user"),
    ("/v1/chat/completions", CHAT | {"stop": ["x"]}, ("stop", 0), "stop"),
    ("/v1/completions", COMPLETION, ("prompt",), "prompt"),
    ("/v1/completions", COMPLETION | {"prompt": ["Hi"]}, ("prompt", 0), "prompt"),
    ("/v1/completions", COMPLETION | {"stop": "x"}, ("stop",), "stop"),
    ("/v1/completions", COMPLETION, ("model",), "model"),
    ("/v1/ab", AB, ("prompt",), "prompt"),
    ("/v1/ab", AB, ("arms", 1), "arms[1]"),
    ("/v1/ab", AB_CHAT, ("messages", 0, "content"), "messages[0].content"),
]  # fmt: skip


def _with(body: dict, path: tuple, value: str) -> dict:
    body = json.loads(json.dumps(body))
    target = body
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return body


def _post(url: str, route: str, body: dict | bytes) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()  # ASCII: escapes
    headers = AUTH | {"Content-Type": "application/json"}
    return httpx.post(f"{url}{route}", content=content, headers=headers, timeout=60)


@pytest.mark.parametrize(("route", "body", "path", "param"), TEXT_FIELDS)
def test_text_that_is_not_unicode_is_a_422_naming_the_field(live_url, route, body, path, param):
    for text in SURROGATES:
        response = _post(live_url, route, _with(body, path, text))
        where = (route, param, ascii(text), response.text[:300])
        assert response.status_code == 422, where
        error = response.json()["error"]
        assert error["code"] == "string_unicode" and error["param"] == param, where
        assert "surrogate" in error["message"], where
    for text in ODD_TEXTS:
        response = _post(live_url, route, _with(body, path, text))
        assert response.status_code < 500, (route, param, ascii(text), response.text[:300])
        if response.status_code >= 400:
            assert set(response.json()["error"]) == ENVELOPE, response.text


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions", "/v1/ab"])
def test_a_body_that_is_not_utf8_is_refused_in_the_envelope(live_url, route):
    for raw in (b'{"model": "base", "prompt": "\xff\xfe"}', b"\xed\xa0\x80", b'{"a": "\xc0\x80"}'):
        response = _post(live_url, route, raw)
        assert 400 <= response.status_code < 500, (route, raw, response.text[:300])
        assert set(response.json()["error"]) == ENVELOPE, response.text
