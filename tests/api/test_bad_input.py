"""Hostile and broken input, each answered with a clear 4xx in the error envelope: malformed JSON,
invalid UTF-8, huge numbers, NaN and infinities, path traversal in names, SQL metacharacters in
filters. On the real store (both backends) with a tiny model behind generation."""

from __future__ import annotations

import json

import pytest

from app.store import crud
from tests.api.conftest import assert_error, dinm_body
from tests.services import AUTH

JSON = {"Content-Type": "application/json"} | AUTH
COMPLETION = {"model": "base", "prompt": "hi", "max_tokens": 2}
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/completions", "/v1/chat/completions",
                                  "/v1/ab", "/v1/keys"])  # fmt: skip
@pytest.mark.parametrize(
    "raw", [b"{", b'{"kind": "dinm",}', b"[1, 2", b"\x00\x01", b"nul", b'{"a": 1} trailing']
)
def test_malformed_json_is_422_json_invalid(client, path, raw):
    error = assert_error(client.post(path, content=raw, headers=JSON), 422)
    assert error["code"] == "json_invalid" and error["param"] is None


@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/completions", "/v1/keys"])
def test_invalid_utf8_is_a_4xx(client, path):
    response = client.post(path, content=b'{"name": "\xff\xfe"}', headers=JSON)
    assert 400 <= response.status_code < 500
    assert_error(response, response.status_code)


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        (b'{"steps": 1' + b"0" * 400 + b"}", "params.steps"),
        (b'{"lr": 1e400}', "params.lr"),
        (b'{"lr": NaN}', "params.lr"),
        (b'{"lr": -Infinity}', "params.lr"),
        (b'{"kl_weight": Infinity}', "params.kl_weight"),
    ],
)
def test_huge_and_non_finite_numbers_in_job_params_are_422(client, raw, param):
    instance = json.dumps(dinm_body()["instance"])
    payload = (
        f'{{"kind": "dinm", "parent": "base", "instance": {instance}, "params": {raw.decode()}}}'
    )
    assert_error(client.post("/v1/jobs", content=payload, headers=JSON), 422, param=param)


@pytest.mark.parametrize(
    ("field", "raw"),
    [("temperature", "NaN"), ("temperature", "Infinity"), ("top_p", "NaN"),
     ("max_tokens", "1" + "0" * 400), ("temperature", "-1"), ("top_p", "1.5"),
     ("presence_penalty", "2.5"), ("frequency_penalty", "-3"), ("logit_bias", '{"x": 1}'),
     ("logit_bias", '{"5": 101}'), ("logit_bias", '{"5": true}')],
)  # fmt: skip
def test_bad_sampling_numbers_are_422(client, field, raw):
    fields = {"model": '"base"', "prompt": '"hi"', "max_tokens": "2", field: raw}
    payload = "{" + ", ".join(f'"{k}": {v}' for k, v in fields.items()) + "}"
    response = client.post("/v1/completions", content=payload, headers=JSON)
    assert_error(response, 422, param=field)


@pytest.mark.parametrize(
    ("field", "raw"),
    [("max_tokens", '"5"'), ("max_tokens", "5.0"), ("stream", '"yes"'), ("stream", "1"),
     ("temperature", '"0.5"'), ("temperature", "true"), ("seed", "1.5"), ("seed", "1e400"),
     ("n", '"1"'), ("top_p", '"1"'), ("presence_penalty", '"1"'), ("logit_bias", "[5]"),
     ("stream_options", '{"include_usage": "yes"}')],
)  # fmt: skip
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_a_value_of_the_wrong_json_type_is_400_not_coerced(client, path, field, raw):
    fields = {"model": '"base"', "prompt": '"hi"', "messages": json.dumps(MESSAGES),
              "max_tokens": "2", field: raw}  # fmt: skip
    del fields["messages" if path == "/v1/completions" else "prompt"]
    payload = "{" + ", ".join(f'"{k}": {v}' for k, v in fields.items()) + "}"
    error = assert_error(client.post(path, content=payload, headers=JSON), 400)
    assert error["param"].split(".")[0] == field and error["code"].endswith("_type"), error


@pytest.mark.parametrize(
    ("field", "value"),
    [("tools", [{"type": "function"}]),
     ("tool_choice", "auto"), ("response_format", {"type": "json_object"}), ("echo", True),
     ("best_of", 3), ("suffix", "!"), ("audio", {}), ("made_up", 1)],
)  # fmt: skip
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_an_openai_parameter_this_server_does_not_implement_is_400_naming_it(
    client, path, field, value
):
    body = {"model": "base", "max_tokens": 2, field: value}
    body |= {"prompt": "hi"} if path == "/v1/completions" else {"messages": MESSAGES}
    error = assert_error(client.post(path, json=body, headers=AUTH), 400, param=field)
    assert error["code"] == "unsupported_parameter", error


@pytest.mark.parametrize(
    "extra",
    [{"logprobs": False}, {"response_format": {"type": "text"}}, {"tool_choice": "none"},
     {"metadata": {"team": "a"}}, {"store": False}, {"service_tier": "auto"},
     {"top_logprobs": None}],
)  # fmt: skip
def test_openai_parameters_asking_for_the_default_are_accepted(client, extra):
    body = {"model": "base", "max_tokens": 2, "messages": MESSAGES} | extra
    response = client.post("/v1/chat/completions", json=body, headers=AUTH)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_top_logprobs_needs_logprobs_and_is_chats_own(client, path):
    if path == "/v1/chat/completions":
        body = {"model": "base", "messages": MESSAGES, "top_logprobs": 2}
        assert_error(client.post(path, json=body, headers=AUTH), 422, param="top_logprobs")
    else:
        body = {"model": "base", "prompt": "hi", "top_logprobs": 2}  # chat's, not the legacy one
        assert_error(client.post(path, json=body, headers=AUTH), 400, param="top_logprobs")


def test_a_huge_but_valid_max_tokens_is_capped(client):
    response = client.post("/v1/completions", json=COMPLETION | {"max_tokens": 100_000},
                           headers=AUTH)  # fmt: skip
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    "path",
    [
        "/v1/versions/..%2F..%2Fetc%2Fpasswd",
        "/v1/versions/%2e%2e",
        "/v1/versions/..%5C..%5Cwindows",
        "/v1/corpora/..%2F..%2Fetc%2Fpasswd",
        "/v1/versions/..%2Fx/export?format=delta",
        "/v1/jobs/..%2F..%2Fetc%2Fpasswd",
    ],
)
def test_path_traversal_in_names_finds_nothing(client, path):
    response = client.get(path, headers=AUTH)
    assert response.status_code in (404, 422), response.text
    assert_error(response, response.status_code)


@pytest.mark.parametrize("name", ["../evil", "a/b", "..", "x\\y", "a\x00b", " lead"])
def test_traversal_names_are_refused_for_new_versions_and_corpora(client, name):
    assert_error(client.post("/v1/jobs", json=dinm_body(name=name), headers=AUTH), 422)
    upload = client.post("/v1/corpora", params={"name": name}, content='"x"\n',
                         headers=AUTH | {"Content-Type": "application/x-ndjson"})  # fmt: skip
    assert_error(upload, 422, param="name")


@pytest.mark.parametrize(
    ("query", "status", "param"),
    [
        ({"status": "' OR '1'='1"}, 422, "status"),
        ({"status": "queued; DROP TABLE jobs; --"}, 422, "status"),
        ({"cursor": "' OR 1=1 --"}, 400, "cursor"),
        ({"cursor": "eyJ4IjogIic7IERST1AgVEFCTEUgam9iczsgLS0ifQ=="}, 400, "cursor"),
        ({"limit": "1; DROP TABLE jobs"}, 422, "limit"),
        ({"limit": "99999999999999999999999"}, 422, "limit"),
    ],
)
def test_sql_metacharacters_in_filters_are_4xx_and_harmless(client, session, query, status,
                                                            param):  # fmt: skip
    assert client.post("/v1/jobs", json=dinm_body(), headers=AUTH).status_code == 202
    assert_error(client.get("/v1/jobs", params=query, headers=AUTH), status, param=param)
    assert crud.count_jobs(session=session) == 1  # the table is there, its row too


def test_sql_in_a_version_name_is_just_a_name(client, session):
    response = client.get("/v1/versions/x'; DROP TABLE versions; --", headers=AUTH)
    assert_error(response, 404)
    assert crud.list_versions(session=session) == []  # the query ran, on a table that exists


def test_a_logit_bias_beyond_the_vocabulary_is_400(client):
    body = COMPLETION | {"logit_bias": {"5": 1, "99999": -100}}
    error = assert_error(client.post("/v1/completions", json=body, headers=AUTH), 400)
    assert error["param"] == "logit_bias" and "99999" in error["message"], error
    body = COMPLETION | {"logit_bias": {"5": 100}, "max_tokens": 4, "temperature": 0}
    answer = client.post("/v1/completions", json=body, headers=AUTH).json()
    assert answer["choices"][0]["text"].split() == ["!"] * 4  # token 5 is "!"


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/ab", "/v1/jobs"])
@pytest.mark.parametrize(
    ("content_type", "shown"),
    [("text/plain", "got 'text/plain'"), ("application/x-www-form-urlencoded", "got"),
     (None, "none was sent")],
)  # fmt: skip
def test_a_body_that_is_not_sent_as_json_is_415_saying_so(client, path, content_type, shown):
    headers = AUTH | ({"Content-Type": content_type} if content_type else {})
    response = client.post(path, content=json.dumps(COMPLETION).encode(), headers=headers)
    error = assert_error(response, 415)
    assert error["code"] == "unsupported_media_type", error
    assert "Content-Type: application/json" in error["message"] and shown in error["message"]


@pytest.mark.parametrize(
    ("part", "what"),
    [({"type": "image_url", "image_url": {"url": "https://example.org/a.png"}}, "image"),
     ({"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}, "audio")],
)  # fmt: skip
def test_a_non_text_content_part_is_400_naming_what_is_not_supported(client, part, what):
    content = [{"type": "text", "text": "what is this?"}, part]
    body = {"model": "base", "max_tokens": 2, "messages": [{"role": "user", "content": content}]}
    response = client.post("/v1/chat/completions", json=body, headers=AUTH)
    error = assert_error(response, 400, param="messages[0].content")
    assert error["code"] == "unsupported_content"
    assert f"{what} input is not supported" in error["message"], error


@pytest.mark.parametrize("raw", ["NaN", "Infinity", "-Infinity", "1e400"])
@pytest.mark.parametrize(
    ("path", "body", "param"),
    [("/v1/completions", '{"model": "base", "prompt": "hi", "temperature": %s}', "temperature"),
     ("/v1/ab", '{"prompt": "hi", "arms": ["base"], "top_p": %s}', "top_p"),
     ("/v1/jobs", json.dumps(dinm_body(params={"lr": 0.1})).replace("0.1", "%s"), "params.lr"),
     ("/v1/experiments", '{"name": "e1", "arms": [{"model": "base", "weight": %s}, '
      '{"model": "other"}]}', "arms[0].weight")],
)  # fmt: skip
def test_a_number_that_is_not_finite_is_refused_as_such(client, raw, path, body, param):
    response = client.post(path, content=(body % raw).encode(), headers=JSON)
    error = assert_error(response, 422, param=param)
    assert error["code"] == "finite_number" and "finite" in error["message"], error


@pytest.mark.parametrize(
    ("header", "how"),
    [("Bearer", "no key after `Bearer`"), ("Bearer   ", "no key after `Bearer`"),
     ("Basic dXNlcjpwYXNz", "the scheme is 'Basic'"), ("dtx_some-key", "no scheme")],
)  # fmt: skip
def test_a_malformed_authorization_header_is_named_as_such(client, header, how):
    error = assert_error(client.get("/v1/versions", headers={"Authorization": header}), 401)
    assert error["code"] == "malformed_authorization", error
    assert how in error["message"] and "Bearer <key>" in error["message"], error
    error = assert_error(client.get("/v1/versions"), 401)
    assert error["code"] == "missing_api_key"


def test_json_nested_too_deeply_is_400_saying_so(client):
    deep = b'{"model": "base", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    for path in ("/v1/chat/completions", "/v1/jobs"):
        error = assert_error(client.post(path, content=deep, headers=JSON), 400)
        assert error["code"] == "body_unparsable" and "nested too deeply" in error["message"]
