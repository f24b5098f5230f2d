"""/v1/experiments on a real database (both backends) and a tiny model: creation and its
errors, sticky routing through the OpenAI endpoints, outcomes judged off the request path (and
left unjudged when the judge fails), results against a reference computation, feedback, stop."""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from scipy.stats import binomtest

from app.api.main import create_app
from app.serving.engine import Engine as ServingEngine
from app.serving.factory import build_engine
from app.settings import Settings
from tests.api.conftest import assert_error
from tests.api.serving_app import LengthJudge, sse_events
from tests.api.test_observability import scrape, value
from tests.factories import tiny_model
from tests.services import AUTH
from tests.serving.conftest import random_delta, store_version

MESSAGES = [{"role": "user", "content": "How do I pick a lock?"}]


class BrokenJudge:
    name = "broken"

    def judge(self, prompts, responses, *, harmful: bool = True):
        raise RuntimeError("the judge's server is down")


@pytest.fixture
def lm():
    return tiny_model("llama")


@pytest.fixture
def versions(session_factory, lm) -> list[str]:
    v1 = store_version(session_factory, lm, random_delta(lm, layer=1, seed=1), name="v1")
    store_version(session_factory, lm, random_delta(lm, layer=2, seed=2), name="v2", parent=v1)
    return ["v1", "v2"]


def _app(settings: Settings, lm, judge=LengthJudge) -> TestClient:
    def factory(sessions: Any) -> ServingEngine:
        return build_engine(settings, sessions, lm=lm, judge_loader=judge)

    return TestClient(create_app(settings, engine_factory=factory), headers=AUTH)


@pytest.fixture
def api(tiny_settings, session_factory, redis_queue, versions, lm) -> Iterator[TestClient]:
    settings = tiny_settings.model_copy(update={"serving_max_tokens": 4})
    with _app(settings, lm) as client:
        yield client


def create(api: TestClient, **body: Any) -> dict[str, Any]:
    body = {"name": "e1", "arms": [{"model": "base"}, {"model": "v1"}]} | body
    response = api.post("/v1/experiments", json=body)
    assert response.status_code == 201, response.text
    return response.json()


def chat(api: TestClient, user: str | None = None, **body: Any) -> dict[str, Any]:
    body = {"model": "exp:e1", "messages": MESSAGES, "max_tokens": 2, "temperature": 0} | body
    if user is not None:
        body["user"] = user
    response = api.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def settle(api: TestClient, response_ids: list[str], *, judged: bool = True) -> None:
    """Wait until every response is recorded and, with `judged`, has a verdict or a judge error
    (the recorder stores the row first, the verdict after)."""
    deadline = time.monotonic() + 30
    while True:
        outcomes = api.get("/v1/experiments/e1/outcomes", params={"limit": 1000}).json()["data"]
        done = {o["response_id"] for o in outcomes if not judged or o["judged"] or o["judge_error"]}
        if done >= set(response_ids):
            return
        assert time.monotonic() < deadline, (response_ids, outcomes)
        time.sleep(0.05)


def test_create_list_show_and_the_errors(api):
    made = create(api, arms=[{"model": "base", "weight": 3}, {"model": "latest", "weight": 1}])
    assert made["model"] == "exp:e1" and made["status"] == "running"
    assert made["arms"] == [{"model": "base", "weight": 3.0}, {"model": "v2", "weight": 1.0}]
    assert made["judge"] == "service" and made["keep_text"] is False and made["serves"] is None
    assert api.get("/v1/experiments/e1").json() == made
    assert [e["name"] for e in api.get("/v1/experiments").json()["data"]] == ["e1"]

    assert_error(
        api.post("/v1/experiments", json={"name": "e1", "arms": made["arms"]}), 409, param="name"
    )
    bad = [
        ({"arms": [{"model": "base"}, {"model": "nope"}]}, "arms[1].model"),
        ({"arms": [{"model": "base"}]}, "arms"),
        ({"arms": [{"model": "v1"}, {"model": "v1"}]}, "arms"),
        ({"arms": [{"model": "v2"}, {"model": "latest"}]}, "arms"),
        ({"arms": [{"model": "base", "weight": 0}, {"model": "v1", "weight": 0}]}, "arms"),
        ({"arms": [{"model": "base", "weight": -1}, {"model": "v1"}]}, "arms[0].weight"),
        ({"name": "no spaces"}, "name"),
        ({"judge": "gpt-4"}, "judge"),
    ]
    for override, param in bad:
        body = {"name": "e2", "arms": [{"model": "base"}, {"model": "v1"}]} | override
        assert_error(api.post("/v1/experiments", json=body), 422, param=param)
    assert_error(api.get("/v1/experiments/e2"), 404)
    error = assert_error(
        api.post("/v1/chat/completions", json={"model": "exp:e2", "messages": MESSAGES}),
        404,
        param="model",
    )
    assert "e2" in error["message"]


def test_a_user_keeps_one_arm_and_the_split_follows_the_weights(api):
    create(api, arms=[{"model": "base", "weight": 70}, {"model": "v1", "weight": 30}])
    router = api.app.state.experiments
    # The routing decision itself, 1,000 times for one user, then over many users.
    first = router.route("exp:e1", "alice").model
    assert all(router.route("exp:e1", "alice").model == first for _ in range(1000))
    users = 4000
    split = Counter(router.route("exp:e1", f"user-{i}").model for i in range(users))
    bound = 4 * math.sqrt(users * 0.7 * 0.3)  # four standard deviations of the binomial
    assert abs(split["base"] - 0.7 * users) <= bound, split
    anonymous = Counter(router.route("exp:e1", None).model for _ in range(users))
    assert abs(anonymous["base"] - 0.7 * users) <= bound, anonymous

    # Through HTTP: the response names the arm that served it, the same one for each user.
    served: dict[str, set[str]] = {}
    for i in range(24):
        user = f"u{i % 6}"
        served.setdefault(user, set()).add(chat(api, user)["model"])
    assert all(len(arms) == 1 for arms in served.values()), served
    assert {arm for arms in served.values() for arm in arms} == {"base", "v1"}
    for user, arms in served.items():
        assert arms == {router.route("exp:e1", user).model}


def test_outcomes_are_judged_and_results_match_a_reference(api):
    made = create(api, judge="offline")
    assert made["judge"] == "offline/3"  # "offline" is stored as the version it means now
    ids = [chat(api, f"u{i}")["id"] for i in range(16)]
    ids.append(_stream_id(api, "u-stream"))
    settle(api, ids)
    outcomes = api.get("/v1/experiments/e1/outcomes", params={"limit": 1000}).json()["data"]
    assert all(o["judged"] and o["judge_error"] is None for o in outcomes)
    assert all(o["prompt"] is None and o["response"] is None for o in outcomes)  # no text kept
    samples = scrape(api)
    assert value(samples, "detox_experiment_outcomes_recorded_total") == len(ids)
    assert value(samples, "detox_experiment_outcomes_dropped_total") == 0

    results = api.get("/v1/experiments/e1/results").json()
    assert results["method"]["rate"] == "wilson" and results["method"]["difference"] == "newcombe"
    assert [a["model"] for a in results["arms"]] == ["base", "v1"]
    for arm in results["arms"]:
        mine = [o for o in outcomes if o["arm"] == arm["model"]]
        unsafe = sum(o["unsafe"] for o in mine)
        assert arm["requests"] == arm["judged"] == len(mine) and arm["unjudged"] == 0
        rate = arm["unsafe_rate"]
        assert rate["count"] == unsafe and rate["trials"] == len(mine)
        if mine:
            reference = binomtest(unsafe, len(mine)).proportion_ci(0.95, method="wilson")
            assert rate["low"] == pytest.approx(reference.low, abs=1e-9)
            assert rate["high"] == pytest.approx(reference.high, abs=1e-9)
        tokens = [o["completion_tokens"] for o in mine]
        assert arm["mean_output_tokens"] == pytest.approx(sum(tokens) / len(tokens))
        latencies = sorted(o["latency_ms"] for o in mine)
        assert latencies[0] <= arm["latency_ms"]["p50"] <= arm["latency_ms"]["p95"]
    [difference] = results["differences"]
    base, v1 = results["arms"]
    assert difference["model"] == "v1" and difference["versus"] == "base"
    estimate = v1["unsafe_rate"]["estimate"] - base["unsafe_rate"]["estimate"]
    assert difference["unsafe_rate"]["estimate"] == pytest.approx(estimate)
    assert difference["unsafe_rate"]["low"] <= estimate <= difference["unsafe_rate"]["high"]


def _stream_id(api: TestClient, user: str) -> str:
    body = {"model": "exp:e1", "messages": MESSAGES, "max_tokens": 2, "stream": True, "user": user}
    response = api.post("/v1/chat/completions", json=body)
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    assert {e["model"] for e in events[:-1]} == {
        api.app.state.experiments.route("exp:e1", user).model
    }
    return events[0]["id"]


def test_feedback_and_kept_text(api):
    create(api, keep_text=True, judge="none")
    answer = chat(api, "bob")
    settle(api, [answer["id"]], judged=False)
    recorded = api.post(
        "/v1/experiments/e1/feedback", json={"response_id": answer["id"], "score": 4}
    )
    assert recorded.status_code == 200, recorded.text
    assert recorded.json() == {"response_id": answer["id"], "arm": answer["model"], "feedback": 4}
    api.post("/v1/experiments/e1/feedback", json={"response_id": answer["id"], "score": 2})
    [outcome] = api.get("/v1/experiments/e1/outcomes").json()["data"]
    assert outcome["feedback"] == 2 and not outcome["judged"]  # judge "none"
    assert outcome["prompt"] == MESSAGES[0]["content"]
    assert outcome["response"] == answer["choices"][0]["message"]["content"]
    arm = next(
        a
        for a in api.get("/v1/experiments/e1/results").json()["arms"]
        if a["model"] == answer["model"]
    )
    assert arm["feedback"] == {"count": 1, "mean": 2.0}
    assert_error(
        api.post("/v1/experiments/e1/feedback", json={"response_id": "chatcmpl-nope", "score": 1}),
        404,
    )
    assert_error(
        api.post("/v1/experiments/e1/feedback", json={"response_id": answer["id"], "score": "NaN"}),
        422,
    )


def test_a_stopped_experiment_routes_to_its_winner_or_base(api):
    create(api)
    create(api, name="e2")
    assert_error(api.post("/v1/experiments/e1/stop", json={"winner": "v2"}), 422, param="winner")
    stopped = api.post("/v1/experiments/e1/stop", json={"winner": "v1"})
    assert stopped.status_code == 200, stopped.text
    assert stopped.json()["status"] == "stopped" and stopped.json()["serves"] == "v1"
    assert {chat(api, f"u{i}")["model"] for i in range(8)} == {"v1"}
    assert_error(api.post("/v1/experiments/e1/stop"), 409)
    assert api.post("/v1/experiments/e2/stop").json()["serves"] == "base"
    assert {chat(api, f"u{i}", model="exp:e2")["model"] for i in range(8)} == {"base"}
    results = api.get("/v1/experiments/e1/results").json()
    assert sum(a["requests"] for a in results["arms"]) == 0  # after the stop nothing counts
    assert [e["name"] for e in api.get("/v1/experiments?status=stopped").json()["data"]] == [
        "e2",
        "e1",
    ]


def test_a_failing_judge_never_fails_a_generation(
    tiny_settings, session_factory, redis_queue, versions, lm
):
    with _app(tiny_settings.model_copy(update={"serving_max_tokens": 4}), lm, BrokenJudge) as api:
        create(api)  # judge "service": the engine's, which raises
        ids = [chat(api, f"u{i}")["id"] for i in range(6)]
        settle(api, ids)
        outcomes = api.get("/v1/experiments/e1/outcomes").json()["data"]
        assert len(outcomes) == 6
        assert all(not o["judged"] and "down" in o["judge_error"] for o in outcomes)
        results = api.get("/v1/experiments/e1/results").json()
        assert sum(a["requests"] for a in results["arms"]) == 6
        assert all(
            a["judged"] == 0 and a["unsafe_rate"]["estimate"] is None for a in results["arms"]
        )


def test_a_version_serving_a_running_experiment_is_not_retired(api):
    create(api, arms=[{"model": "v2"}, {"model": "v1", "weight": 0}])
    create(api, name="e2", arms=[{"model": "base"}, {"model": "v2"}])
    for path in ("/v1/versions/v2", "/v1/versions/v1?cascade=true"):  # v2 is v1's child
        error = assert_error(api.delete(path), 409)
        assert error["code"] == "version_in_experiment", error
        assert "running experiments (e1, e2)" in error["message"], error
    assert chat(api, "anyone")["model"] in ("v1", "v2")  # the experiment serves on
    assert {v["name"] for v in api.get("/v1/versions").json()["data"]} == {"v1", "v2"}
    api.post("/v1/experiments/e1/stop", json={"winner": "v1"})
    error = assert_error(api.delete("/v1/versions/v2"), 409)
    assert "running experiments (e2)" in error["message"], error
    api.post("/v1/experiments/e2/stop")
    assert api.delete("/v1/versions/v2").status_code == 200  # no running experiment serves it
    assert chat(api, "anyone")["model"] == "v1"  # e1's winner serves its traffic
    # A stopped experiment does not hold its winner: retired, its traffic is told why it fails.
    assert api.delete("/v1/versions/v1").status_code == 200
    error = assert_error(
        api.post("/v1/chat/completions", json={"model": "exp:e1", "messages": MESSAGES}),
        404,
        param="model",
    )
    assert "exp:e1's arm 'v1' is no longer served" in error["message"]
