"""schemathesis against the live OpenAPI spec of a real server (uvicorn on loopback, SQLite store,
Redis broker, a tiny model): generated requests on every operation, from the schema (positive)
and against it (negative). No answer may be a 500, and every error must be in the
`{"error": {...}}` envelope.

The cases are drawn with Hypothesis directly from each operation's strategy (schemathesis's
pytest plugin does not support this pytest), seeded, so a failure is reproducible.
"""

from __future__ import annotations

from collections.abc import Iterator

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
EXAMPLES = 60  # per operation and mode


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
