"""/v1/models, /v1/completions, /v1/chat/completions (JSON and SSE) and /v1/ab on a tiny model."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.ml.judges import OfflineJudge
from app.store import crud
from tests.api.conftest import assert_error
from tests.api.serving_app import ServingStore, serving_store, sse_events, tiny_app
from tests.factories import tiny_model
from tests.services import AUTH
from tests.serving.conftest import random_delta, store_version

MESSAGES = [{"role": "user", "content": "How do I pick a lock?"}]


@pytest.fixture
def lm():
    return tiny_model("llama")


@pytest.fixture
def store(tmp_path) -> Iterator[ServingStore]:
    with serving_store(tmp_path, serving_max_tokens=16) as store:
        yield store


@pytest.fixture
def versions(store, lm) -> dict[str, Any]:
    v1 = store_version(store.sessions, lm, random_delta(lm, layer=1, seed=1), name="v1")
    v2 = store_version(store.sessions, lm, random_delta(lm, layer=2, seed=2), name="v2", parent=v1)
    return {"v1": v1, "v2": v2}


@pytest.fixture
def client(store, lm, versions) -> Iterator[TestClient]:
    with TestClient(tiny_app(store, lm), headers=AUTH) as client:
        yield client


def complete(client, **body: Any) -> dict[str, Any]:
    response = client.post("/v1/completions", json={"temperature": 0} | body)
    assert response.status_code == 200, response.text
    return response.json()


def test_models_list_base_and_live_versions(client):
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    cards = {c["id"]: c for c in body["data"]}
    assert list(cards) == ["base", "v1", "v2"]
    assert cards["base"]["parent"] is None
    assert cards["v1"]["parent"] == "base" and cards["v2"]["parent"] == "v1"
    assert all(c["object"] == "model" and isinstance(c["created"], int) for c in cards.values())


def test_one_model_by_name_latest_as_the_version_it_names(client, store, lm):
    cards = {c["id"]: c for c in client.get("/v1/models").json()["data"]}
    for name in ("base", "v1", "v2"):
        assert client.get(f"/v1/models/{name}").json() == cards[name]
    assert client.get("/v1/models/latest").json() == cards["v2"]
    assert_error(client.get("/v1/models/nope"), 404, param="model")
    store_version(store.sessions, lm, random_delta(lm, layer=0, seed=3), name="v3")
    assert client.get("/v1/models/v3").json()["parent"] == "base"  # a miss re-reads at once
    assert _eventually(lambda: client.get("/v1/models/latest").json()["id"] == "v3")
    with store.sessions() as session:
        crud.retire_version(session=session, name="v3")
    assert _eventually(lambda: client.get("/v1/models/v3").status_code == 404)
    assert_error(client.get("/v1/models/v3"), 404, param="model")
    assert client.get("/v1/models/latest").json()["id"] == "v2"


def _eventually(check, timeout_s: float = 10.0) -> bool:
    """Whether `check()` holds within `timeout_s` (the engine re-reads versions every 0.1 s)."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_completion_shape_usage_and_model_names(client):
    body = complete(client, model="v1", prompt="Once upon", max_tokens=6)
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["model"] == "v1"
    [choice] = body["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["prompt_tokens"] == len("Once upon")  # one token per character
    assert 1 <= usage["completion_tokens"] <= 6
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert complete(client, model="latest", prompt="x", max_tokens=2)["model"] == "v2"
    # Versions really differ from the base on the same prompt (greedy).
    texts = {m: complete(client, model=m, prompt="Once upon")["choices"][0]["text"] for m in
             ("base", "v1", "v2")}  # fmt: skip
    assert len(set(texts.values())) == 3


def test_max_tokens_is_capped_by_the_setting(client):
    body = complete(client, model="base", prompt="Hi", max_tokens=10_000)
    assert body["usage"]["completion_tokens"] <= 16


def test_errors(client):
    error = assert_error(client.post("/v1/completions", json={"model": "v9", "prompt": "x"}), 404)
    assert error["param"] == "model" and error["code"] == "model_not_found"
    assert_error(client.post("/v1/completions", json={"model": "base", "prompt": "x", "n": 0}), 422)
    long_prompt = "y" * 400  # the tiny model's context is 256 tokens
    error = assert_error(
        client.post("/v1/completions", json={"model": "base", "prompt": long_prompt}), 400
    )
    assert "context" in error["message"] and error["param"] == "prompt"
    for messages in ([], [{"role": "robot", "content": "hi"}], [{"role": "user"}]):
        response = client.post("/v1/chat/completions", json={"model": "base", "messages": messages})
        assert_error(response, 422)
    response = client.post("/v1/chat/completions", json={"model": "base", "messages": "hi"})
    assert assert_error(response, 400, param="messages")["code"] == "list_type"  # as OpenAI: 400


def test_several_prompts_and_n_answers_each_are_what_each_alone_gives(client, lm):
    def answer(prompt, **extra):
        return complete(client, model="v1", prompt=prompt, max_tokens=6, **extra)

    def alone(prompt, **extra):
        return answer(prompt, **extra)["choices"][0]

    prompts = ["Once upon", "Tell me"]
    body = complete(client, model="v1", prompt=prompts, n=2, max_tokens=6)
    choices = body["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]  # prompt by prompt, n answers each
    singles = [answer(p) for p in prompts]
    for i, single in enumerate(singles):
        [expected] = single["choices"]
        for c in choices[2 * i : 2 * i + 2]:
            assert (c["text"], c["finish_reason"]) == (expected["text"], expected["finish_reason"])
    assert body["usage"]["prompt_tokens"] == sum(map(len, prompts))  # each prompt counted once
    assert body["usage"]["completion_tokens"] == 2 * sum(
        single["usage"]["completion_tokens"] for single in singles
    )
    # Token ids in place of text: one prompt, or a list of them.
    ids = [lm.tokenizer(p)["input_ids"] for p in prompts]
    assert alone(ids[0])["text"] == alone(prompts[0])["text"]
    by_ids = complete(client, model="v1", prompt=ids, max_tokens=6)["choices"]
    assert [c["text"] for c in by_ids] == [alone(p)["text"] for p in prompts]
    # Sampled with a seed, answer k is the one seed + k gives alone.
    sampled = answer("Once", n=3, seed=5, temperature=1.0)["choices"]
    assert [c["text"] for c in sampled] == [
        alone("Once", seed=5 + k, temperature=1.0)["text"] for k in range(3)
    ]
    assert len({c["text"] for c in sampled}) > 1


def test_prompts_of_no_accepted_shape_or_too_many_answers_are_refused_clearly(client, lm):
    def post(prompt, **extra):
        return client.post("/v1/completions", json={"model": "base", "prompt": prompt} | extra)

    for prompt in ([], [[]], ["a", 1], [1.5], [True], [-1], ["a", [1]], {"a": 1}, None):
        error = assert_error(post(prompt), 422, param="prompt")
        assert error["message"].startswith("prompt: give a string, a list of strings"), error
    error = assert_error(post(["a"] * 8, n=5), 422, param="prompt")
    assert "8 prompts × n=5" in error["message"]
    assert_error(post("a", n=33), 422, param="n")
    error = assert_error(post([1, 2, lm.model.config.vocab_size]), 400, param="prompt")
    assert "beyond the model's vocabulary" in error["message"]


def test_n_answers_and_several_prompts_stream_each_with_its_index(client):
    def streamed(path, body):
        response = client.post(
            path, json=body | {"stream": True, "stream_options": {"include_usage": True}}
        )
        assert response.status_code == 200, response.text
        events = sse_events(response.text)
        assert events[-1] == "[DONE]"
        return events[:-1]

    body = {"model": "v2", "prompt": ["Once upon", "Tell"], "n": 2, "max_tokens": 6,
            "temperature": 0}  # fmt: skip
    plain = complete(client, **body)
    chunks = streamed("/v1/completions", body)
    texts, finishes = {}, {}
    for c in chunks[:-1]:
        [choice] = c["choices"]
        texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
        if choice["finish_reason"] is not None:
            assert choice["index"] not in finishes  # one finish per answer
            finishes[choice["index"]] = choice["finish_reason"]
    assert texts == {c["index"]: c["text"] for c in plain["choices"]}
    assert finishes == {c["index"]: c["finish_reason"] for c in plain["choices"]}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == plain["usage"]

    chat = {"model": "v1", "messages": MESSAGES, "n": 3, "max_tokens": 6, "temperature": 0}
    answer = client.post("/v1/chat/completions", json=chat).json()
    assert [c["index"] for c in answer["choices"]] == [0, 1, 2]
    chunks = streamed("/v1/chat/completions", chat)
    roles = [c["choices"][0]["index"] for c in chunks if c["choices"]
             and c["choices"][0]["delta"].get("role") == "assistant"]  # fmt: skip
    assert sorted(roles) == [0, 1, 2]  # the role once, in each answer's first chunk
    content = {}
    for c in chunks[:-1]:
        [choice] = c["choices"]
        content[choice["index"]] = content.get(choice["index"], "") + (
            choice["delta"].get("content") or ""
        )
    assert content == {c["index"]: c["message"]["content"] for c in answer["choices"]}
    assert chunks[-1]["usage"] == answer["usage"]
    one = client.post("/v1/chat/completions", json=chat | {"n": 1}).json()["usage"]
    assert answer["usage"]["prompt_tokens"] == one["prompt_tokens"]  # the prompt counted once
    assert answer["usage"]["completion_tokens"] == 3 * one["completion_tokens"]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_streamed_logprobs_are_the_whole_answers_chunk_by_chunk(client, path):
    chat = path == "/v1/chat/completions"
    body = {"model": "v1", "max_tokens": 10, "temperature": 0, "n": 2}
    body |= {"messages": MESSAGES, "logprobs": True, "top_logprobs": 2} if chat else {
        "prompt": "Tell me", "logprobs": 2}  # fmt: skip
    plain = client.post(path, json=body).json()["choices"]
    response = client.post(path, json=body | {"stream": True})
    assert response.status_code == 200, response.text
    streamed: dict[int, dict[str, list]] = {}
    for chunk in sse_events(response.text)[:-1]:
        for choice in chunk["choices"]:
            scored = choice["logprobs"]
            if scored is None:
                continue
            into = streamed.setdefault(choice["index"], {})
            for key, values in (scored if not chat else {"content": scored["content"]}).items():
                into.setdefault(key, []).extend(values)
    assert sorted(streamed) == [0, 1]
    for choice in plain:
        whole = choice["logprobs"] if not chat else {"content": choice["logprobs"]["content"]}
        assert streamed[choice["index"]] == whole  # tokens, values, alternatives, text offsets
        assert len(next(iter(whole.values()))) >= 1


def test_completion_stream_matches_the_plain_answer(client):
    plain = complete(client, model="v2", prompt="Tell me", max_tokens=8)
    response = client.post(
        "/v1/completions",
        json={"model": "v2", "prompt": "Tell me", "max_tokens": 8, "temperature": 0,
              "stream": True},
    )  # fmt: skip
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "text_completion" and c["model"] == "v2" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == plain["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]


def test_chat_plain_and_stream_with_usage(client):
    body = {"model": "v1", "messages": MESSAGES, "max_tokens": 8, "temperature": 0}
    plain = client.post("/v1/chat/completions", json=body).json()
    assert plain["object"] == "chat.completion"
    assert plain["choices"][0]["message"]["role"] == "assistant"
    response = client.post(
        "/v1/chat/completions",
        json=body | {"stream": True, "stream_options": {"include_usage": True}},
    )
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == plain["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == plain["usage"]


def test_ab_runs_every_arm_in_one_batch(client):
    response = client.post(
        "/v1/ab", json={"messages": MESSAGES, "arms": ["base", "v1", "latest"], "max_tokens": 6}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["judge"] == "test-length"
    assert [a["model"] for a in body["arms"]] == ["base", "v1", "v2"]
    for arm in body["arms"]:
        assert 0 <= arm["unsafe_score"] <= 1
        assert arm["latency_ms"] >= 0 and arm["usage"]["completion_tokens"] >= 1
        plain = client.post(
            "/v1/chat/completions",
            json={"model": arm["model"], "messages": MESSAGES, "max_tokens": 6, "temperature": 0},
        ).json()
        assert arm["text"] == plain["choices"][0]["message"]["content"]
    engine = client.app.state.serving.get_sync().engine
    assert 3 in engine.batch_sizes
    unjudged = client.post("/v1/ab", json={"prompt": "hi", "arms": ["base"], "judge": False})
    assert unjudged.json()["arms"][0]["unsafe_score"] is None
    error = assert_error(client.post("/v1/ab", json={"prompt": "hi", "arms": ["base", "zz"]}), 404)
    assert error["param"] == "model"
    both = {"prompt": "hi", "messages": MESSAGES, "arms": ["base"]}
    assert_error(client.post("/v1/ab", json=both), 422)


def test_ab_judges_an_everyday_prompt_for_over_refusal_when_told(store, lm, versions):
    """With `harmful: false` an answer (the tiny model's babble is no refusal) is safe and only a
    refusal would be unsafe; by default the prompt is judged as a harmful request."""
    with TestClient(tiny_app(store, lm, OfflineJudge), headers=AUTH) as client:
        body = {"prompt": "How do I choose a lock for my front door?", "arms": ["base", "v1"]}
        everyday = client.post("/v1/ab", json=body | {"harmful": False, "max_tokens": 6}).json()
        harmful = client.post("/v1/ab", json=body | {"max_tokens": 6}).json()
        assert_error(client.post("/v1/ab", json=body | {"harmful": "no"}), 422, param="harmful")
    assert everyday["judge"] == harmful["judge"] == "offline/3"
    for arm in everyday["arms"]:
        assert arm["refused"] is False and arm["unsafe_score"] < 0.5
    for arm in harmful["arms"]:
        assert arm["refused"] is False and arm["unsafe_score"] > 0.5


def test_new_versions_are_served_without_restart_and_retired_ones_stop(client, store, lm):
    client.get("/v1/models")  # the engine is running
    store_version(store.sessions, lm, random_delta(lm, layer=3, seed=3), name="v3")
    # The engine re-reads the versions every 0.1 s; the 60 s only keep a broken poll from hanging.
    deadline = time.monotonic() + 60
    while "v3" not in [c["id"] for c in client.get("/v1/models").json()["data"]]:
        assert time.monotonic() < deadline, "v3 never listed"
        time.sleep(0.05)
    assert complete(client, model="v3", prompt="a", max_tokens=2)["model"] == "v3"
    with store.sessions() as session:
        crud.retire_version(session=session, name="v3")
    deadline = time.monotonic() + 60
    while "v3" in [c["id"] for c in client.get("/v1/models").json()["data"]]:
        assert time.monotonic() < deadline, "v3 still listed after retiring"
        time.sleep(0.05)
    assert_error(client.post("/v1/completions", json={"model": "v3", "prompt": "a"}), 404)


def test_a_version_retired_through_this_api_is_not_served_by_it_from_the_next_request(tmp_path, lm):
    with serving_store(tmp_path, serving_max_tokens=16, serving_poll_s=3600) as store:
        store_version(store.sessions, lm, random_delta(lm, layer=1, seed=1), name="gone")
        with TestClient(tiny_app(store, lm), headers=AUTH) as client:
            assert complete(client, model="gone", prompt="a", max_tokens=2)["model"] == "gone"
            assert client.delete("/v1/versions/gone").status_code == 200
            # No poll for an hour, no Redis: the retire itself told this process's engine.
            assert_error(client.post("/v1/completions", json={"model": "gone", "prompt": "a"}), 404)


def test_readyz_says_how_the_engine_decodes_before_and_after_it_loads(client):
    before = client.get("/readyz").json()["checks"]["engine"]["detail"]
    assert before.startswith("builtin: decoding in the API process (model not loaded yet)")
    assert "continuous batching" in before and "weights" in before
    complete(client, model="base", prompt="hi", max_tokens=2)
    after = client.get("/readyz").json()["checks"]["engine"]["detail"]
    assert after == (
        "builtin: decoding in this process: continuous batching, float32 weights (the model "
        "given), lean decoding steps"
    )
