"""Structured logs of the real processes: `detox api` and a worker write one JSON object a line;
the API's carry the request id, the worker's the job id."""

from __future__ import annotations

import json
from pathlib import Path

from tests.processes import Processes

INSTANCE = json.loads(
    (Path(__file__).resolve().parents[2] / "examples" / "safeedit_example.json").read_text()
)[0]


# Celery writes this one notice straight to stdout when told to stop, not through logging.
CELERY_SHUTDOWN = "worker: Warm shutdown (MainProcess)"


def records(path: Path) -> list[dict]:
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return [json.loads(line) for line in lines if line != CELERY_SHUTDOWN]  # else: not JSON


def test_api_and_worker_logs_are_json_with_request_and_job_ids(tmp_path, tiny_model_dir):
    home = tmp_path / "home"
    home.mkdir()
    service = Processes(home, {"DETOX_MODEL": str(tiny_model_dir), "DETOX_MAX_NEW_TOKENS": "4"})
    service.start()
    try:
        with service.http() as http:
            params = {"steps": 2, "preset": "contrastive"}
            body = {"kind": "dinm", "parent": "base", "instance": INSTANCE, "params": params}
            response = http.post("/v1/jobs", json=body, headers={"X-Request-ID": "trace-77"})
            assert response.headers["X-Request-ID"] == "trace-77"
            job_id = response.json()["id"]
        assert service.wait_job(job_id)["status"] == "succeeded"
    finally:
        service.stop()
    [api_log] = home.glob("*-api.log")
    [worker_log] = home.glob("*-worker.log")
    access = [r for r in records(api_log) if r["logger"] == "detox.access"]
    [submitted] = [r for r in access if r["request_id"] == "trace-77"]
    assert (submitted["method"], submitted["route"], submitted["status"]) == (
        "POST", "/v1/jobs", 202,
    )  # fmt: skip
    assert all(r["request_id"] for r in access)
    job_lines = [r for r in records(worker_log) if r.get("job_id") == job_id]
    messages = " | ".join(r["message"] for r in job_lines)
    assert "attempt 1" in messages and "succeeded" in messages, messages
