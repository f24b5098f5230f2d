"""The official `openai` client, unchanged, against a live server on a loopback port.

The server is the real thing: `create_app` with its default engine, which loads the model the
settings name (a tiny model saved to a folder, as DETOX_MODEL would point to)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.api.serving_app import live_server
from tests.services import ADMIN_KEY, AUTH


@pytest.fixture
def base_url(tmp_path) -> Iterator[str]:
    with live_server(tmp_path) as (url, _app):
        yield f"{url}/v1"


def test_openai_client_plain_and_streaming(base_url):
    client = openai.OpenAI(base_url=base_url, api_key=ADMIN_KEY, max_retries=0, timeout=60)
    models = [m.id for m in client.models.list()]
    assert models == ["base", "safe1"]
    assert client.models.retrieve("latest").id == "safe1"
    assert client.models.retrieve("base").parent is None  # the card's extra field comes along
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")

    messages = [{"role": "user", "content": "Say something."}]
    chat = client.chat.completions.create(
        model="safe1", messages=messages, max_tokens=8, temperature=0, seed=1
    )
    assert chat.model == "safe1" and chat.choices[0].message.role == "assistant"
    assert chat.usage.completion_tokens >= 1
    text = chat.choices[0].message.content

    stream = client.chat.completions.create(
        model="safe1", messages=messages, max_tokens=8, temperature=0, stream=True
    )
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert streamed == text

    completion = client.completions.create(
        model="base", prompt="Hello", max_tokens=5, temperature=0
    )
    assert completion.choices[0].finish_reason in ("stop", "length")
    pieces = client.completions.create(
        model="base", prompt="Hello", max_tokens=5, temperature=0, stream=True
    )
    assert "".join(p.choices[0].text for p in pieces) == completion.choices[0].text

    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="nope", messages=messages)
    assert caught.value.body["param"] == "model"

    # What the server does not do is refused by name, what it does is honoured.
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="base", messages=messages, tools=[
            {"type": "function", "function": {"name": "f", "parameters": {}}}])  # fmt: skip
    assert caught.value.body["param"] == "tools"
    scored = client.chat.completions.create(
        model="safe1", messages=messages, max_tokens=8, temperature=0, seed=1, logprobs=True,
        top_logprobs=2, presence_penalty=0.0, frequency_penalty=0.0,
    )  # fmt: skip
    assert scored.choices[0].message.content == text
    content = scored.choices[0].logprobs.content
    assert len(content) >= 1 and all(len(t.top_logprobs) == 2 for t in content)
    assert all(t.logprob <= 0 and t.top_logprobs[0].logprob >= t.logprob for t in content)
    legacy = client.completions.create(
        model="base", prompt="Hello", max_tokens=5, temperature=0, logprobs=1
    )
    assert len(legacy.choices[0].logprobs.token_logprobs) == len(legacy.choices[0].logprobs.tokens)

    # n answers, several prompts, token ids: each answer alone's, in OpenAI's order.
    many = client.completions.create(
        model="base", prompt=["Hello", "Bye"], n=2, max_tokens=5, temperature=0
    )
    bye = client.completions.create(model="base", prompt="Bye", max_tokens=5, temperature=0)
    assert [c.text for c in many.choices] == [completion.choices[0].text] * 2 + [
        bye.choices[0].text
    ] * 2
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    chats = client.chat.completions.create(
        model="safe1", messages=messages, max_tokens=8, temperature=0, n=2
    )
    assert [c.message.content for c in chats.choices] == [text, text]
    streamed_choices: dict[int, str] = {}
    for chunk in client.chat.completions.create(
        model="safe1", messages=messages, max_tokens=8, temperature=0, n=2, stream=True
    ):
        for choice in chunk.choices:
            streamed_choices[choice.index] = streamed_choices.get(choice.index, "") + (
                choice.delta.content or ""
            )
    assert streamed_choices == {0: text, 1: text}
    scored_stream = client.chat.completions.create(
        model="safe1", messages=messages, max_tokens=8, temperature=0, seed=1, logprobs=True,
        top_logprobs=2, stream=True,
    )  # fmt: skip
    streamed_scores = [
        entry.token
        for chunk in scored_stream
        for choice in chunk.choices
        if choice.logprobs
        for entry in choice.logprobs.content
    ]
    assert streamed_scores == [t.token for t in content]


def test_openai_client_in_an_experiment(tmp_path):
    with live_server(tmp_path) as (url, app):
        made = httpx.post(
            f"{url}/v1/experiments",
            headers=AUTH,
            json={
                "name": "oa",
                "judge": "offline",
                "arms": [{"model": "base"}, {"model": "safe1"}],
            },
        )
        assert made.status_code == 201, made.text
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=ADMIN_KEY, max_retries=0, timeout=60)
        messages = [{"role": "user", "content": "Say something."}]
        served = {}
        for user in ("ann", "bo", "cy", "di", "ed", "fay"):
            answer = client.chat.completions.create(
                model="exp:oa", messages=messages, max_tokens=4, user=user
            )
            again = client.chat.completions.create(
                model="exp:oa", messages=messages, max_tokens=4, user=user, stream=True
            )
            chunks = list(again)
            assert {chunk.model for chunk in chunks} == {answer.model}  # the user's one arm
            served[answer.id] = served[chunks[0].id] = answer.model
        assert set(served.values()) <= {"base", "safe1"}
        for response_id in served:
            app.state.outcomes.wait(response_id, 30)
        results = httpx.get(f"{url}/v1/experiments/oa/results", headers=AUTH).json()
        assert sum(arm["requests"] for arm in results["arms"]) == 12  # streamed ones too
        with pytest.raises(openai.BadRequestError) as caught:  # its outcomes are per answer
            client.chat.completions.create(model="exp:oa", messages=messages, max_tokens=4, n=2)
        assert caught.value.body["param"] == "n"


@pytest.mark.parametrize("answers", [1, 3])
def test_a_client_that_disconnects_frees_its_slot(tmp_path, answers):
    with live_server(tmp_path, serving_max_tokens=240) as (url, app):
        body = {"model": "base", "prompt": "a", "max_tokens": 240, "temperature": 0,
                "stream": True, "n": answers}  # fmt: skip
        with httpx.Client(base_url=url, timeout=30, headers=AUTH) as client:
            with client.stream("POST", "/v1/completions", json=body) as response:
                assert next(response.iter_lines()).startswith("data: ")
            # the connection is closed: the request must leave its batch before its 240 tokens
            engine = app.state.serving.get_sync().engine
            deadline = time.monotonic() + 10
            while engine.cancelled < answers or engine.pending:
                assert time.monotonic() < deadline, "the requests were not cancelled"
                time.sleep(0.02)
            assert engine.cancelled == answers
            done = client.post("/v1/completions", json=body | {"stream": False, "max_tokens": 3})
            assert done.status_code == 200


def test_preload_loads_the_model_before_the_first_request(tmp_path):
    with live_server(tmp_path, serving_preload=True) as (url, app):
        assert app.state.serving.loaded
        response = httpx.get(f"{url}/v1/models", timeout=30, headers=AUTH)
        assert [m["id"] for m in response.json()["data"]] == ["base", "safe1"]
    with live_server(tmp_path / "lazy") as (url, app):
        assert not app.state.serving.loaded
