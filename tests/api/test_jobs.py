"""POST/GET /v1/jobs, cancel and pagination, on both databases with a real Redis broker."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from app.api.main import create_app
from app.ml.dinm_params import DEFAULT_PRESET, DinmParams
from app.store import crud
from tests.api.conftest import assert_error, closed_port, dinm_body, queued_tasks
from tests.instances import safeedit_instance
from tests.services import AUTH
from tests.store import factories

JOB_KEYS = {
    "id", "kind", "status", "stage", "progress", "parent", "version", "metrics", "error",
    "attempts", "cancel_requested", "created_at", "started_at", "finished_at",
}  # fmt: skip


def test_submit_answers_202_with_the_job_and_enqueues_it(api, session, redis_queue):
    response = api.post("/v1/jobs", json=dinm_body(name="no-theft", params={"steps": 2}))
    assert response.status_code == 202, response.text
    job = response.json()
    assert set(job) == JOB_KEYS
    assert job["kind"] == "dinm" and job["status"] == "queued"
    assert job["parent"] == "base" and job["version"] is None
    assert job["progress"] == 0.0 and job["attempts"] == 0 and job["error"] is None
    assert job["created_at"] and job["started_at"] is None and job["finished_at"] is None
    assert queued_tasks(redis_queue) == 1
    spec = crud.get_job(session=session, job_id=job["id"]).spec
    # under the dataset field names
    assert spec["instance"]["safe generation"] == safeedit_instance()["safe generation"]
    # Defaults filled in: the default preset's, with the explicit steps over it.
    assert spec["params"]["steps"] == 2 and spec["params"]["lr"] == DinmParams().lr
    assert spec["params"]["preset"] == DEFAULT_PRESET
    assert spec["name"] == "no-theft"
    assert api.get(f"/v1/jobs/{job['id']}").json() == job


def test_a_job_of_several_instances_is_accepted_and_stores_them_all(api, session, redis_queue):
    body = dinm_body(instances=[safeedit_instance(), safeedit_instance(id="t2")])
    del body["instance"]
    response = api.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    spec = crud.get_job(session=session, job_id=response.json()["id"]).spec
    assert [i["id"] for i in spec["instances"]] == ["t1", "t2"] and "instance" not in spec


def test_idempotency_key_returns_the_same_job(api, session, redis_queue):
    headers = {"Idempotency-Key": "retry-me"}
    first = api.post("/v1/jobs", json=dinm_body(), headers=headers)
    again = api.post("/v1/jobs", json=dinm_body(), headers=headers)
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"]
    assert again.headers["Idempotent-Replayed"] == "true"
    assert crud.count_jobs(session=session) == 1
    assert queued_tasks(redis_queue) == 1  # enqueued once


def test_a_retry_is_the_same_request_however_it_is_written(api, session, redis_queue):
    headers = {"Idempotency-Key": "spelled-out"}
    first = api.post("/v1/jobs", json=dinm_body(), headers=headers).json()
    body = dict(reversed(dinm_body().items()))
    lr = DinmParams.parse({"preset": "contrastive"}).lr
    body["params"] = {"steps": 2, "preset": "contrastive", "lr": lr}  # the preset's own lr
    again = api.post("/v1/jobs", json=body, headers=headers)
    assert again.status_code == 202 and again.json()["id"] == first["id"]
    assert crud.count_jobs(session=session) == 1


def test_a_key_reused_with_another_body_is_refused_and_makes_no_job(api, session, redis_queue):
    headers = {"Idempotency-Key": "used-once"}
    first = api.post("/v1/jobs", json=dinm_body(), headers=headers).json()
    other = api.post("/v1/jobs", json=dinm_body(params={"steps": 3}), headers=headers)
    error = assert_error(other, 422, param="Idempotency-Key")
    assert error["code"] == "idempotency_key_reused" and first["id"] in error["message"]
    assert crud.count_jobs(session=session) == 1 and queued_tasks(redis_queue) == 1


def test_a_key_used_by_another_api_key_is_a_conflict_not_their_job(api, session, redis_queue):
    made = api.post("/v1/keys", json={"name": "second", "role": "editor"}).json()
    headers = {"Idempotency-Key": "shared-by-chance"}
    mine = api.post("/v1/jobs", json=dinm_body(), headers=headers).json()
    theirs = api.post(
        "/v1/jobs",
        json=dinm_body(),
        headers=headers | {"Authorization": f"Bearer {made['key']}"},
    )
    error = assert_error(theirs, 409, param="Idempotency-Key")
    assert error["code"] == "idempotency_key_in_use" and mine["id"] not in error["message"]
    assert crud.count_jobs(session=session) == 1


def test_idempotent_retry_of_a_finished_job_is_not_a_name_conflict(api, session):
    headers = {"Idempotency-Key": "k-done"}
    job = api.post("/v1/jobs", json=dinm_body(name="done-name"), headers=headers).json()
    crud.claim_job(session=session, job_id=job["id"], worker="w")
    crud.finish_job_succeeded(
        session=session,
        job_id=job["id"],
        version_name="done-name",
        base_model="tiny",
        base_fingerprint=factories.FINGERPRINT,
        metrics={},
        deltas=[factories.delta()],
    )
    again = api.post("/v1/jobs", json=dinm_body(name="done-name"), headers=headers)
    assert again.status_code == 202
    assert again.json()["version"] == "done-name" and again.json()["status"] == "succeeded"


def test_duplicate_version_name_is_409(api, session):
    factories.version(session, name="taken")
    error = assert_error(api.post("/v1/jobs", json=dinm_body(name="taken")), 409, param="name")
    assert error["code"] == "duplicate_version_name" and "taken" in error["message"]


def test_unknown_or_retired_parent_is_404(api, session):
    assert_error(api.post("/v1/jobs", json=dinm_body(parent="nope")), 404, param="parent")
    factories.version(session, name="old")
    crud.retire_version(session=session, name="old")
    assert_error(api.post("/v1/jobs", json=dinm_body(parent="old")), 404, param="parent")
    assert crud.count_jobs(session=session, status="queued") == 0


def test_parent_version_and_latest(api, session):
    factories.version(session, name="p1")
    assert api.post("/v1/jobs", json=dinm_body(parent="p1")).json()["parent"] == "p1"
    assert api.post("/v1/jobs", json=dinm_body(parent="latest")).json()["parent"] == "p1"


@pytest.mark.parametrize(
    "body, param, words",
    [
        (dinm_body(params={"lr": -1}), "params.lr", "greater than 0"),
        (dinm_body(params={"steps": "many"}), "params.steps", "integer"),
        (dinm_body(params={"learning_rate": 1}), "params.learning_rate", "not permitted"),
        (
            dinm_body(instance=safeedit_instance(without=["safe generation"])),
            "instance.safe generation",
            "required",
        ),
        (
            dinm_body(instance=safeedit_instance(knowledge_constrain={"prompt": "x"})),
            "instance.knowledge constrain.answer",
            "required",
        ),
        ({"kind": "unlearn", "method": "masked_ga"}, "forget", "corpus_id"),
        ({"kind": "eval", "suites": []}, "suites", "at least 1"),
        (dinm_body(kind="magic"), "kind", "'dinm'"),
        (dinm_body(name="base"), "name", "reserved"),
        (dinm_body(name="bad name!"), "name", "invalid version name"),
        (dinm_body(extra=1), "extra", "not permitted"),
        (dinm_body(instances=[safeedit_instance()]), "instances", "not both"),
        ({"kind": "dinm", "instances": []}, "instances", "at least 1"),
        (
            {"kind": "dinm", "instances": [safeedit_instance(), {"id": "t2"}]},
            "instances[1].adversarial prompt",
            "required",
        ),
    ],
)
def test_invalid_jobs_are_422_naming_the_field(api, session, body, param, words):
    error = assert_error(api.post("/v1/jobs", json=body), 422, param=param)
    assert error["type"] == "invalid_request_error"
    assert words in error["message"] and error["message"].startswith(param)
    assert crud.count_jobs(session=session) == 0


def test_malformed_json_and_bad_header_are_422(api):
    response = api.post(
        "/v1/jobs", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert_error(response, 422)
    assert_error(api.post("/v1/jobs", json=[1]), 422)
    long_key = {"Idempotency-Key": "k" * 300}
    assert_error(api.post("/v1/jobs", json=dinm_body(), headers=long_key), 422)


def test_unknown_job_is_404(api):
    for response in (
        api.get("/v1/jobs/00000000-0000-0000-0000-000000000000"),
        api.post("/v1/jobs/nope/cancel"),
        api.get("/v1/jobs/nope/events"),
    ):
        assert assert_error(response, 404)["code"] == "not_found"


def test_cursor_pagination_and_status_filter(api, session):
    ids = [api.post("/v1/jobs", json=dinm_body()).json()["id"] for _ in range(5)]
    api.post(f"/v1/jobs/{ids[0]}/cancel")
    seen, cursor, pages = [], None, 0
    while True:
        params = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        page = api.get("/v1/jobs", params=params).json()
        assert set(page) == {"data", "next_cursor"}
        seen += [job["id"] for job in page["data"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == 3 and seen == ids[::-1]  # newest first, each job once
    cancelled = api.get("/v1/jobs", params={"status": "cancelled"}).json()["data"]
    assert [job["id"] for job in cancelled] == [ids[0]]
    assert_error(api.get("/v1/jobs", params={"cursor": "garbage!"}), 400, param="cursor")
    assert_error(api.get("/v1/jobs", params={"status": "lost"}), 422, param="status")
    assert_error(api.get("/v1/jobs", params={"limit": 0}), 422, param="limit")


def test_cancel_a_queued_job(api, session):
    job = api.post("/v1/jobs", json=dinm_body()).json()
    cancelled = api.post(f"/v1/jobs/{job['id']}/cancel")
    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "cancelled" and cancelled.json()["finished_at"]
    assert api.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] == "cancelled"


def test_a_cancel_of_a_running_job_shows_as_pending(api, session):
    job = api.post("/v1/jobs", json=dinm_body()).json()
    assert job["cancel_requested"] is False
    crud.claim_job(session=session, job_id=job["id"], worker="w1")  # as a worker does
    answer = api.post(f"/v1/jobs/{job['id']}/cancel").json()
    assert (answer["status"], answer["cancel_requested"]) == ("running", True)
    assert api.get(f"/v1/jobs/{job['id']}").json()["cancel_requested"] is True


def test_broker_down_on_submit_is_503_and_leaves_no_queued_job(api_settings, session):
    down = api_settings.model_copy(update={"broker_url": f"redis://127.0.0.1:{closed_port()}/0"})
    with TestClient(create_app(down), headers=AUTH) as client:
        error = assert_error(client.post("/v1/jobs", json=dinm_body()), 503)
    assert error["code"] == "broker_unavailable" and error["type"] == "service_unavailable_error"
    assert crud.count_jobs(session=session, status="queued") == 0
    [job] = crud.list_jobs(session=session).items
    assert job.status == "failed" and job.error["code"] == "broker_unavailable"


def test_a_retry_with_the_same_key_sends_the_job_once_the_broker_is_back(
    api_settings, session, redis_queue
):
    down = api_settings.model_copy(update={"broker_url": f"redis://127.0.0.1:{closed_port()}/0"})
    headers = {"Idempotency-Key": "retry-me"}
    with TestClient(create_app(down), headers=AUTH) as client:
        assert_error(client.post("/v1/jobs", json=dinm_body(), headers=headers), 503)
    with TestClient(create_app(api_settings), headers=AUTH) as client:  # the broker is back
        retried = client.post("/v1/jobs", json=dinm_body(), headers=headers)
        assert retried.status_code == 202, retried.text
        assert "Idempotent-Replayed" not in retried.headers
        job = retried.json()
        assert (job["status"], job["error"], job["finished_at"]) == ("queued", None, None)
        assert queued_tasks(redis_queue) == 1
        again = client.post("/v1/jobs", json=dinm_body(), headers=headers)
        assert again.headers["Idempotent-Replayed"] == "true" and again.json()["id"] == job["id"]
        assert queued_tasks(redis_queue) == 1  # sent once
    assert len(crud.list_jobs(session=session).items) == 1


def test_unexpected_errors_are_500_in_the_envelope(api_settings, session):
    class BrokenBroker:
        def enqueue(self, job_id: str) -> None:
            raise RuntimeError("boom")

        def ping(self, timeout: float) -> None:
            raise RuntimeError("boom")

    app = create_app(api_settings, broker=BrokenBroker())
    with TestClient(app, raise_server_exceptions=False, headers=AUTH) as client:
        error = assert_error(client.post("/v1/jobs", json=dinm_body()), 500)
    assert error["type"] == "internal_error" and "boom" not in error["message"]
    assert crud.count_jobs(session=session, status="queued") == 0


def test_a_layer_the_base_model_does_not_have_is_422_at_submit(
    api_settings, session, redis_queue, tiny_model_dir
):
    settings = api_settings.model_copy(update={"model": str(tiny_model_dir)})  # 4 layers
    unlearn = {"kind": "unlearn", "forget": ["x"]}
    with TestClient(create_app(settings), headers=AUTH) as client:
        for body, param in [
            (dinm_body(params={"layer": 4}), "params.layer"),
            (dinm_body(params={"layer": 999}), "params.layer"),
            (unlearn | {"params": {"layers": [0, 9]}}, "params.layers[1]"),
        ]:
            error = assert_error(client.post("/v1/jobs", json=body), 422, param=param)
            assert error["code"] == "layer_out_of_range", error
            assert "has layers 0..3" in error["message"] and tiny_model_dir.name in error["message"]
        assert client.post("/v1/jobs", json=dinm_body(params={"layer": 3})).status_code == 202
        ok = client.post("/v1/jobs", json=unlearn | {"params": {"layers": [3]}})
        assert ok.status_code == 202, ok.text
    assert queued_tasks(redis_queue) == 2  # nothing was queued for the refused ones
    # A model whose config this process cannot read (a hub id): the worker checks instead.
    hub = api_settings.model_copy(update={"model": "someone/some-model"})
    with TestClient(create_app(hub), headers=AUTH) as client:
        assert client.post("/v1/jobs", json=dinm_body(params={"layer": 999})).status_code == 202


def test_a_rank_above_the_projections_full_rank_is_accepted(
    api_settings, session, redis_queue, tiny_model_dir
):
    """The edit cuts it to the full rank and says so in its warnings (tests/ml/test_dinm_rank)."""
    settings = api_settings.model_copy(update={"model": str(tiny_model_dir)})  # hidden size 32
    with TestClient(create_app(settings), headers=AUTH) as client:
        assert client.post("/v1/jobs", json=dinm_body(params={"rank": 33})).status_code == 202
    assert queued_tasks(redis_queue) == 1
