"""/v1/corpora (JSON Lines uploads validated as they stream in, list, show, delete) and the job
kinds that use them: `unlearn` and `eval` submissions, on both databases with a real Redis."""

from __future__ import annotations

import asyncio
import csv
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, get_args

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError
from sqlalchemy import func, select
from starlette.requests import Request

import app.ml
from app.api.corpus_upload import CONTENT_TYPES, read_corpus
from app.api.errors import ApiError
from app.api.main import create_app
from app.job_spec import BiasType
from app.ml.corpus import MAX_LINE_BYTES, Document
from app.ml.unlearn_params import UnlearnParams
from app.settings import Settings
from app.store import crud
from app.store.models import Corpus
from tests.api.conftest import assert_error, queued_tasks
from tests.instances import safeedit_instance
from tests.services import AUTH
from tests.store import factories

CORPUS_KEYS = {"id", "name", "documents", "annotated", "bytes", "sha256", "created_at"}
NDJSON = {"Content-Type": "application/x-ndjson"}
GOOD = (
    b'{"text": "Those people are vermin.", "harmful_spans": [[17, 23]], "id": 7}\r\n'
    b"\n"
    b'"a bare string"\n'
    b'{"text": "caf\xc3\xa9 talk", "meta": {"source": "forum"}}'  # no final newline
)
GOOD_DOCS = [
    Document("Those people are vermin.", ((17, 23),), "7"),
    Document("a bare string"),
    Document("café talk"),
]


def _corpora(session) -> int:
    session.expire_all()
    return session.scalar(select(func.count()).select_from(Corpus)) or 0


def _upload(client: TestClient, body: bytes | list[bytes], name: str | None = None) -> Any:
    """POST the corpus; a list of chunks is sent as a generator: chunked, no Content-Length."""
    params = {"name": name} if name is not None else {}
    content = _chunks(body) if isinstance(body, list) else body
    return client.post("/v1/corpora", params=params, content=content, headers=NDJSON)


def _chunks(parts: list[bytes]) -> Iterator[bytes]:
    yield from parts


def _post_job(client: TestClient, body: dict[str, Any]) -> Any:
    """POST a job as ASCII JSON (so that a lone surrogate travels as its escape)."""
    content = json.dumps(body).encode()
    return client.post("/v1/jobs", content=content, headers={"Content-Type": "application/json"})


@pytest.fixture
def small_api(api_settings: Settings, session_factory, redis_queue, monkeypatch) -> Iterator[Any]:
    """The API with DETOX_CORPUS_MAX_BYTES=2048 (read from the environment)."""
    monkeypatch.setenv("DETOX_CORPUS_MAX_BYTES", "2048")
    settings = Settings(**api_settings.model_dump(include={"home", "database_url", "broker_url"}))
    assert settings.corpus_max_bytes == 2048
    with TestClient(create_app(settings), headers=AUTH) as client:
        yield client


# --- uploads -------------------------------------------------------------------------------------


def test_upload_stores_the_validated_documents(api, session):
    response = _upload(api, GOOD, name="gender")
    assert response.status_code == 201, response.text
    corpus = response.json()
    assert set(corpus) == CORPUS_KEYS
    assert corpus["name"] == "gender" and corpus["documents"] == 3 and corpus["annotated"] == 1
    assert response.headers["Location"] == f"/v1/corpora/{corpus['id']}"
    stored = bytes(session.scalar(select(Corpus.content).where(Corpus.id == corpus["id"])))
    assert corpus["bytes"] == len(stored)
    assert corpus["sha256"] == hashlib.sha256(stored).hexdigest()
    assert json.loads(stored.split(b"\n")[0]) == {
        "text": "Those people are vermin.",
        "harmful_spans": [[17, 23]],
        "id": "7",
    }
    assert crud.corpus_documents(session=session, corpus_id=corpus["id"]) == GOOD_DOCS
    assert api.get(f"/v1/corpora/{corpus['id']}").json() == corpus
    assert api.get("/v1/corpora/gender").json() == corpus


@pytest.mark.parametrize(
    "content_type",
    [
        "application/x-ndjson",
        "application/jsonl",
        "text/plain; charset=utf-8",
        "application/octet-stream",
        None,
    ],
)
def test_accepted_content_types(api, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    response = api.post("/v1/corpora", content=b'"one"\n', headers=headers)
    assert response.status_code == 201, response.text


def test_the_documented_upload_example_is_a_valid_corpus(api, session):
    body = api.get("/openapi.json").json()["paths"]["/v1/corpora"]["post"]["requestBody"]
    assert set(body["content"]) == set(CONTENT_TYPES)
    for media_type, content in body["content"].items():
        response = api.post(
            "/v1/corpora", content=content["example"], headers={"Content-Type": media_type}
        )
        assert response.status_code == 201, response.text
    documents = crud.corpus_documents(session=session, corpus_id=response.json()["id"])
    assert documents[0].harmful_text == ["vermin"] and len(documents) == 3


@pytest.mark.parametrize("content_type", ["application/json", "multipart/form-data; boundary=x"])
def test_other_content_types_are_415(api, session, content_type):
    response = api.post("/v1/corpora", content=b'"one"\n', headers={"Content-Type": content_type})
    error = assert_error(response, 415, param="Content-Type")
    assert error["code"] == "unsupported_media_type" and "application/x-ndjson" in error["message"]
    assert _corpora(session) == 0


def test_a_line_split_across_chunks_is_read_whole(api, session):
    body = [b'"a"\n{"te', b'xt": "b", "harmful_', b'spans": [[0, 1]]}\n', b'"c"']
    response = _upload(api, body)
    assert response.status_code == 201, response.text
    assert (response.json()["documents"], response.json()["annotated"]) == (3, 1)


@pytest.mark.parametrize(
    "body, line, words",
    [
        (b'"ok"\n"ok"\n{"text": "broken"\n"ok"\n', 3, "invalid JSON"),
        (b'"ok"\n{"text": "short", "harmful_spans": [[2, 9]]}\n', 2, "harmful_spans[0] = [2, 9]"),
        (b'{"text": "a", "harmful_spans": [[0, 1], [0, 1]]}\n', 1, "overlap"),
        (b'"ok"\n\n"ok"\n"caf\xe9"\n', 4, "not UTF-8"),
        (b'{"text": "a", "label": 1}\n', 1, "unknown field 'label'"),
        (b'"ok"\n42\n', 2, "expected a JSON object"),
        (b'"ok"\n{"text": "  "}\n', 2, "`text` must be a non-empty string"),
        (b'"ok"\n"ok"\n"half \\ud800 a pair"\n', 3, "unpaired surrogate"),
        ([b'"a"\n{"te', b'xt": "b"}\n{"text": ', b"1}\n"], 3, "`text` must be"),
        (b'"ok"\n"' + b"x" * MAX_LINE_BYTES + b'"\n', 2, f"longer than {MAX_LINE_BYTES}"),
    ],
)
def test_a_bad_line_is_422_naming_it_and_nothing_is_stored(api, session, body, line, words):
    error = assert_error(_upload(api, body, name="bad"), 422, param=f"line {line}")
    assert error["code"] == "invalid_corpus" and error["type"] == "invalid_request_error"
    assert f"line {line}: " in error["message"] and words in error["message"]
    assert _corpora(session) == 0
    assert _upload(api, b'"fine"\n', name="bad").status_code == 201  # the name is still free


@pytest.mark.parametrize("body", [b"", b"\n \n\r\n", [b"\n", b"", b"  "]])
def test_an_empty_corpus_is_422(api, session, body):
    error = assert_error(_upload(api, body), 422)
    assert error["code"] == "empty_corpus" and "no document" in error["message"]
    assert _corpora(session) == 0


def test_over_the_limit_is_413_streamed_or_declared(small_api, session):
    line = b'"' + b"x" * 97 + b'"\n'  # 100 bytes
    streamed = _upload(small_api, [line] * 30)  # 3000 bytes, no Content-Length
    error = assert_error(streamed, 413)
    assert error["code"] == "corpus_too_large" and "2,048 bytes" in error["message"]
    declared = _upload(small_api, line * 30)  # Content-Length: 3000
    assert assert_error(declared, 413)["code"] == "corpus_too_large"
    assert _corpora(session) == 0
    at_limit = line * 20 + b'"' + b"y" * 45 + b'"\n'  # exactly 2048 bytes
    assert len(at_limit) == 2048
    assert _upload(small_api, [at_limit]).status_code == 201


def test_the_limit_setting_has_sane_bounds(monkeypatch):
    monkeypatch.delenv("DETOX_CORPUS_MAX_BYTES", raising=False)
    assert Settings().corpus_max_bytes == 50 * 1024 * 1024
    for bad in (0, 1023, 513 * 1024 * 1024):
        with pytest.raises(ValidationError, match="corpus_max_bytes"):
            Settings(corpus_max_bytes=bad)


def _read(
    chunks: list[bytes],
    *,
    max_bytes: int,
    headers: list[tuple[bytes, bytes]] | None = None,
    complete: bool = True,
) -> tuple[Any, int]:
    """read_corpus over an ASGI receive channel; (its result or error, messages pulled).
    Not `complete`: the client disconnects after the chunks."""
    pulled = 0

    async def receive() -> dict[str, Any]:
        nonlocal pulled
        pulled += 1
        if pulled <= len(chunks):
            more = pulled < len(chunks) or not complete
            return {"type": "http.request", "body": chunks[pulled - 1], "more_body": more}
        return {"type": "http.disconnect"}

    scope = {"type": "http", "method": "POST", "path": "/v1/corpora", "headers": headers or []}

    async def run() -> Any:
        try:
            return await read_corpus(Request(scope, receive), max_bytes=max_bytes)
        except ApiError as exc:
            return exc

    return asyncio.run(run()), pulled


def test_the_body_is_not_read_past_the_limit_or_a_bad_line():
    chunk = b'"abc"\n' * 100  # 600 bytes
    error, pulled = _read([chunk] * 50, max_bytes=1500)
    assert isinstance(error, ApiError) and error.status == 413
    assert pulled == 3  # 1800 bytes > 1500: refused there, 47 chunks never read
    error, pulled = _read([b'"ok"\n{bad\n"more"\n', *[chunk] * 50], max_bytes=10**6)
    assert isinstance(error, ApiError) and (error.status, error.param) == (422, "line 2")
    assert pulled == 1
    documents, pulled = _read([chunk] * 3, max_bytes=1800)
    assert len(documents) == 300 and pulled == 3
    # A declared Content-Length over the limit: refused before reading anything.
    error, pulled = _read([chunk] * 3, max_bytes=1500, headers=[(b"content-length", b"1800")])
    assert isinstance(error, ApiError) and error.status == 413 and pulled == 0
    # A line that is already too long is refused before its end arrives.
    piece = b"x" * (MAX_LINE_BYTES // 2 + 1)
    error, pulled = _read([b'"', *[piece] * 10], max_bytes=10**8)
    assert isinstance(error, ApiError) and (error.status, error.param) == (422, "line 1")
    assert f"longer than {MAX_LINE_BYTES} bytes" in error.message and pulled == 3
    # The client went away mid-body: an input error, not a server error.
    error, pulled = _read([chunk] * 2, max_bytes=10**6, complete=False)
    assert isinstance(error, ApiError) and (error.status, error.code) == (400, "upload_interrupted")
    assert pulled == 3


def test_names(api, session):
    assert _upload(api, GOOD, name="dup").status_code == 201
    error = assert_error(_upload(api, GOOD, name="dup"), 409, param="name")
    assert error["code"] == "duplicate_corpus_name" and "dup" in error["message"]
    for bad in ("base", "no spaces", "0b3ac3a6-1c2d-4e5f-8a9b-0c1d2e3f4a5b", ""):
        error = assert_error(_upload(api, GOOD, name=bad), 422, param="name")
        assert error["code"] == "invalid_corpus_name"
    assert_error(_upload(api, GOOD, name="x" * 65), 422, param="name")
    # The name is checked before the body is read: a bad body is not even looked at.
    assert_error(_upload(api, b"{not json", name="dup"), 409, param="name")
    assert_error(_upload(api, b"{not json", name="latest"), 422, param="name")
    assert _corpora(session) == 1


def test_list_show_delete(api, session):
    ids = [_upload(api, GOOD, name=f"c{i}").json()["id"] for i in range(3)]
    listed = api.get("/v1/corpora").json()
    assert set(listed) == {"data"} and [c["id"] for c in listed["data"]] == ids[::-1]
    assert all(set(c) == CORPUS_KEYS for c in listed["data"])
    assert [c["name"] for c in api.get("/v1/corpora", params={"limit": 1}).json()["data"]] == ["c2"]
    assert_error(api.get("/v1/corpora", params={"limit": 0}), 422, param="limit")
    deleted = api.delete("/v1/corpora/c1")
    assert deleted.status_code == 204 and deleted.content == b""
    deleted = api.delete(f"/v1/corpora/{ids[0]}")
    assert deleted.status_code == 204
    assert [c["name"] for c in api.get("/v1/corpora").json()["data"]] == ["c2"]
    for response in (api.get("/v1/corpora/c1"), api.delete("/v1/corpora/c1")):
        error = assert_error(response, 404)
        assert error["code"] == "not_found" and "no corpus 'c1'" in error["message"]
    assert _corpora(session) == 1


def test_a_corpus_in_use_by_a_queued_job_is_not_deleted(api, session):
    _upload(api, GOOD, name="busy")
    job = api.post("/v1/jobs", json={"kind": "unlearn", "corpus_id": "busy"}).json()
    error = assert_error(api.delete("/v1/corpora/busy"), 409)
    assert error["code"] == "corpus_in_use" and job["id"] in error["message"]
    api.post(f"/v1/jobs/{job['id']}/cancel")
    assert api.delete("/v1/corpora/busy").status_code == 204


# --- unlearn jobs --------------------------------------------------------------------------------


def _spec(session, job_id: str) -> dict[str, Any]:
    return crud.get_job(session=session, job_id=job_id).spec


def test_unlearn_with_inline_documents(api, session, redis_queue):
    body = {
        "kind": "unlearn",
        "name": "less-hate",
        "method": "graddiff",
        "forget": [
            {"text": "Those people are vermin.", "harmful_spans": [[17, 23]], "id": 7},
            {"text": "tagged", "meta": {"source": "x"}},
            "bare",
        ],
        "retain": ["The weather is mild."],
        "params": {"steps": 3, "lr": 1e-4},
    }
    response = api.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    job = response.json()
    assert (job["kind"], job["status"], job["parent"]) == ("unlearn", "queued", "base")
    assert queued_tasks(redis_queue) == 1
    assert _spec(session, job["id"]) == {
        "kind": "unlearn",
        "parent": "base",
        "name": "less-hate",
        "method": "graddiff",
        "forget": [
            {"text": "Those people are vermin.", "harmful_spans": [[17, 23]], "id": "7"},
            {"text": "tagged"},
            {"text": "bare"},
        ],
        "corpus_id": None,
        "retain": [{"text": "The weather is mild."}],
        "retain_corpus_id": None,
        "params": UnlearnParams(steps=3, lr=1e-4).model_dump(mode="json"),
    }


def test_unlearn_of_stored_corpora_stores_their_ids(api, session):
    forget = _upload(api, GOOD, name="hate").json()
    retain = _upload(api, b'"kind words"\n').json()
    parent = factories.version(session, name="p1")
    body = {"kind": "unlearn", "parent": "latest", "corpus_id": "hate"}
    response = api.post("/v1/jobs", json=body | {"retain_corpus_id": retain["id"]})
    assert response.status_code == 202, response.text
    assert response.json()["parent"] == "p1"
    assert crud.get_job(session=session, job_id=response.json()["id"]).parent_version_id == (
        parent.id
    )
    spec = _spec(session, response.json()["id"])
    assert (spec["corpus_id"], spec["retain_corpus_id"]) == (forget["id"], retain["id"])
    assert spec["forget"] is None and spec["retain"] is None and spec["method"] == "masked_ga"
    assert spec["parent"] == "latest" and spec["params"] == UnlearnParams().model_dump(mode="json")


def test_unlearn_is_idempotent_too(api, session, redis_queue):
    body = {"kind": "unlearn", "forget": ["x"]}
    first = api.post("/v1/jobs", json=body, headers={"Idempotency-Key": "u1"}).json()
    again = api.post("/v1/jobs", json=body, headers={"Idempotency-Key": "u1"})
    assert again.json()["id"] == first["id"] and again.headers["Idempotent-Replayed"] == "true"
    assert queued_tasks(redis_queue) == 1


UNLEARN = {"kind": "unlearn", "forget": ["x"]}


@pytest.mark.parametrize(
    "body, status, param, words",
    [
        ({"kind": "unlearn"}, 422, "forget", "corpus_id"),
        (UNLEARN | {"corpus_id": "c"}, 422, "corpus_id", "not both"),
        (UNLEARN | {"retain": ["r"], "retain_corpus_id": "c"}, 422, "retain_corpus_id", "not both"),
        (UNLEARN | {"forget": []}, 422, "forget", "at least 1"),
        (UNLEARN | {"forget": ["a", "b", "c", {"text": "d", "harmful_spans": [[0, 2]]}]}, 422,
         "forget[3]", "harmful_spans[0] = [0, 2] is not inside the text"),
        (UNLEARN | {"forget": ["ok", ""]}, 422, "forget[1]", "`text` must be a non-empty"),
        (UNLEARN | {"forget": [{"text": "a", "label": 1}]}, 422, "forget[0]", "unknown field"),
        (UNLEARN | {"forget": [7]}, 422, "forget[0]", "JSON object"),
        (UNLEARN | {"forget": ["half \ud800"]}, 422, "forget[0]", "surrogate"),
        (UNLEARN | {"forget": "x"}, 422, "forget", "list"),
        (UNLEARN | {"retain": [{"text": ""}]}, 422, "retain[0]", "`text`"),
        (UNLEARN | {"method": "sgd"}, 422, "method", "masked_ga"),
        (UNLEARN | {"params": {"lr": -1}}, 422, "params.lr", "greater than 0"),
        (UNLEARN | {"params": {"scope": "full"}}, 422, "params.scope", "lora"),
        (UNLEARN | {"params": {"learning_rate": 1}}, 422, "params.learning_rate", "not permitted"),
        (UNLEARN | {"params": {"layers": [1, 1]}}, 422, "params", "must not repeat"),
        (UNLEARN | {"name": "latest"}, 422, "name", "reserved"),
        (UNLEARN | {"instance": safeedit_instance()}, 422, "instance", "not permitted"),
        ({"kind": "unlearn", "corpus_id": "missing"}, 404, "corpus_id", "no corpus 'missing'"),
        (UNLEARN | {"retain_corpus_id": "gone"}, 404, "retain_corpus_id", "no corpus 'gone'"),
        (UNLEARN | {"parent": "nope"}, 404, "parent", "not a live version"),
        (UNLEARN | {"name": "taken"}, 409, "name", "already exists"),
        ({"forget": ["x"]}, 422, "kind", "required"),
    ],
)  # fmt: skip
def test_invalid_unlearn_jobs_name_the_field(api, session, body, status, param, words):
    factories.version(session, name="taken")
    jobs = crud.count_jobs(session=session)
    error = assert_error(_post_job(api, body), status, param=param)
    assert words in error["message"], error
    if status == 422:
        assert error["message"].startswith(f"{param}: ")
    assert crud.count_jobs(session=session) == jobs


# --- eval jobs -----------------------------------------------------------------------------------


def test_eval_defaults_to_the_base_and_every_suite(api, session, redis_queue):
    response = api.post("/v1/jobs", json={"kind": "eval"})
    assert response.status_code == 202, response.text
    job = response.json()
    assert (job["kind"], job["parent"], job["version"]) == ("eval", "base", None)
    assert queued_tasks(redis_queue) == 1
    assert crud.get_job(session=session, job_id=job["id"]).parent_version_id is None
    assert _spec(session, job["id"]) == {
        "kind": "eval",
        "model": "base",
        "suites": ["safeedit", "bias", "perplexity"],
        "params": {"limit": None, "bias_types": None, "instances": None, "texts": None},
    }


def test_eval_of_a_version_resolves_latest_and_keeps_its_inputs(api, session):
    factories.version(session, name="old")
    newest = factories.version(session, name="new")
    body = {
        "kind": "eval",
        "model": "latest",
        "suites": ["perplexity", "safeedit", "bias"],
        "params": {"limit": 5, "bias_types": ["gender", "race-color"],
                   "instances": [safeedit_instance()], "texts": ["Reference text."]},
    }  # fmt: skip
    response = api.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    assert response.json()["parent"] == "new"
    assert api.get(f"/v1/jobs/{response.json()['id']}").json()["parent"] == "new"
    row = crud.get_job(session=session, job_id=response.json()["id"])
    assert row.parent_version_id == newest.id
    spec = row.spec
    assert spec["model"] == "new" and spec["suites"] == ["perplexity", "safeedit", "bias"]
    assert spec["params"]["limit"] == 5 and spec["params"]["texts"] == ["Reference text."]
    assert spec["params"]["bias_types"] == ["gender", "race-color"]
    [instance] = spec["params"]["instances"]
    # under the dataset field names
    assert instance["safe generation"] == safeedit_instance()["safe generation"]
    named = api.post("/v1/jobs", json={"kind": "eval", "model": "old", "suites": ["bias"]})
    assert named.status_code == 202 and named.json()["parent"] == "old"


EVAL = {"kind": "eval"}


@pytest.mark.parametrize(
    "body, status, param, words",
    [
        (EVAL | {"model": "nope"}, 404, "model", "not a live version"),
        (EVAL | {"model": "retired"}, 404, "model", "not a live version"),
        (EVAL | {"suites": []}, 422, "suites", "at least 1"),
        (EVAL | {"suites": ["bias", "bias"]}, 422, "suites", "must not repeat"),
        (EVAL | {"suites": ["bias", "toxicity"]}, 422, "suites[1]", "'perplexity'"),
        (EVAL | {"params": {"limit": 0}}, 422, "params.limit", "greater than or equal to 1"),
        (EVAL | {"params": {"bias_types": []}}, 422, "params.bias_types", "at least 1"),
        (EVAL | {"params": {"bias_types": ["age", "age"]}}, 422, "params.bias_types", "repeat"),
        (EVAL | {"params": {"bias_types": ["gender", "race"]}}, 422, "params.bias_types[1]",
         "'race-color'"),
        (EVAL | {"suites": ["safeedit"], "params": {"bias_types": ["gender"]}}, 422,
         "params.bias_types", "bias suite"),
        (EVAL | {"suites": ["bias"], "params": {"texts": ["t"]}}, 422, "params.texts",
         "perplexity suite"),
        (EVAL | {"suites": ["bias"], "params": {"instances": [safeedit_instance()]}}, 422,
         "params.instances", "safeedit suite"),
        (EVAL | {"params": {"instances": [safeedit_instance(safe_generation="")]}}, 422,
         "params.instances[0].safe generation", "at least 1 character"),
        (EVAL | {"params": {"texts": ["ok", ""]}}, 422, "params.texts[1]", "at least 1"),
        (EVAL | {"params": {"seed": 1}}, 422, "params.seed", "not permitted"),
        (EVAL | {"name": "v9"}, 422, "name", "not permitted"),
        (EVAL | {"parent": "base"}, 422, "parent", "not permitted"),
    ],
)  # fmt: skip
def test_invalid_eval_jobs_name_the_field(api, session, body, status, param, words):
    factories.version(session, name="retired")
    crud.retire_version(session=session, name="retired")
    error = assert_error(_post_job(api, body), status, param=param)
    assert words in error["message"], error
    if status == 404:
        assert error["code"] == "model_not_found"
    assert crud.count_jobs(session=session, status="queued") == 0


def test_the_bias_types_are_those_of_the_packaged_pairs():
    path = Path(app.ml.__file__).parent / "data" / "crows_pairs_anonymized.csv"
    with path.open(newline="", encoding="utf-8") as handle:
        packaged = {row["bias_type"] for row in csv.DictReader(handle)}
    assert set(get_args(BiasType)) == packaged


def test_every_job_example_in_the_docs_is_accepted(api, session):
    factories.version(session, name="v1")
    _upload(api, GOOD, name="gender-hate")
    _upload(api, b'"The committee met on Monday."\n', name="benign-news")
    spec = api.get("/openapi.json").json()
    content = spec["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]
    examples = content["examples"]
    assert {"dinm", "unlearn", "unlearn-corpus", "eval"} <= set(examples)
    for name, example in examples.items():
        response = api.post("/v1/jobs", json=example["value"])
        assert response.status_code == 202, (name, response.text)
    schemas = spec["components"]["schemas"]
    assert set(schemas["JobCreate"]["discriminator"]["mapping"]) == {"dinm", "unlearn", "eval"}
    for kind in ("DinmJobCreate", "UnlearnJobCreate", "EvalJobCreate"):
        assert schemas[kind]["examples"], kind
