"""/metrics (Prometheus) and request ids, on the real store (both backends) with a tiny model."""

from __future__ import annotations

import json
import logging

import pytest
from prometheus_client.parser import text_string_to_metric_families

from app import logs
from app.store import crud
from tests.api.conftest import dinm_body
from tests.factories import tiny_model
from tests.services import AUTH
from tests.serving.conftest import random_delta, store_version


def scrape(client) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of the /metrics page."""
    response = client.get("/metrics", headers=AUTH)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_request_latency_by_route_template_and_status(client):
    for _ in range(2):
        assert client.get("/v1/versions", headers=AUTH).status_code == 200
    assert client.get("/v1/jobs/no-such-job", headers=AUTH).status_code == 404
    assert client.get("/v1/versions").status_code == 401
    samples = scrape(client)
    count = "detox_http_request_duration_seconds_count"
    assert value(samples, count, method="GET", route="/v1/versions", status="200") == 2
    assert value(samples, count, method="GET", route="/v1/versions", status="401") == 1
    # the template, never the raw path: one series however many ids are asked for
    assert value(samples, count, method="GET", route="/v1/jobs/{job_id}", status="404") == 1
    assert not any("no-such-job" in str(labels) for _, labels in samples)


def test_a_scrape_never_loads_the_model(client):
    samples = scrape(client)
    assert not client.app.state.serving.loaded
    assert value(samples, "detox_version_cache_size") == 0


def test_tokens_by_model_and_the_version_cache(client, session_factory):
    lm = tiny_model("llama")  # the same weights the app serves (seeded)
    store_version(session_factory, lm, random_delta(lm, layer=1, seed=1), name="v1")
    used = {"base": 0, "v1": 0}
    for model in ("base", "v1", "v1", "v1"):
        body = {"model": model, "prompt": "hello", "max_tokens": 3, "temperature": 0}
        response = client.post("/v1/completions", json=body, headers=AUTH)
        assert response.status_code == 200, response.text
        used[model] += response.json()["usage"]["completion_tokens"]
    streamed = client.post("/v1/completions", headers=AUTH, json={
        "model": "v1", "prompt": "hi", "max_tokens": 2, "stream": True,
        "stream_options": {"include_usage": True},
    })  # fmt: skip
    final = [json.loads(line[6:]) for line in streamed.text.splitlines()
             if line.startswith("data: {")][-1]  # fmt: skip
    used["v1"] += final["usage"]["completion_tokens"]
    samples = scrape(client)
    assert value(samples, "detox_generated_tokens_total", model="base") == used["base"] > 0
    assert value(samples, "detox_generated_tokens_total", model="v1") == used["v1"] > 0
    assert value(samples, "detox_version_cache_misses_total") == 1  # v1 loaded once
    assert value(samples, "detox_version_cache_hits_total") >= 3
    assert value(samples, "detox_version_cache_size") == 1


def test_jobs_by_kind_and_status_queue_depth_and_durations(client, session):
    for _ in range(2):
        assert client.post("/v1/jobs", json=dinm_body(), headers=AUTH).status_code == 202
    job, _ = crud.create_job(session=session, kind="eval", spec={})
    crud.claim_job(session=session, job_id=job.id, worker="w")
    crud.finish_job_failed(session=session, job_id=job.id, error={"message": "x"})
    samples = scrape(client)
    assert value(samples, "detox_jobs", kind="dinm", status="queued") == 2
    assert value(samples, "detox_jobs", kind="eval", status="failed") == 1
    assert value(samples, "detox_jobs", kind="unlearn", status="running") == 0
    assert value(samples, "detox_queue_depth") == 2
    assert value(samples, "detox_job_duration_seconds_count", kind="eval") == 1
    assert value(samples, "detox_job_duration_seconds_bucket", kind="eval", le="+Inf") == 1
    assert value(samples, "detox_job_duration_seconds_count", kind="dinm") == 0  # none finished


def test_metrics_need_a_reader_key(client):
    assert client.get("/metrics").status_code == 401


@pytest.mark.parametrize(
    ("sent", "kept"), [("req-42.a:b", True), ("x" * 200, False), ("bad id\n", False)]
)
def test_the_request_id_is_echoed_or_made(client, sent, kept):
    response = client.get("/healthz", headers={"X-Request-ID": sent})
    echoed = response.headers["X-Request-ID"]
    assert (echoed == sent) is kept
    assert echoed and len(echoed) <= 128
    other = client.get("/healthz").headers["X-Request-ID"]
    assert other != echoed and len(other) == 32  # a fresh one per request


def test_json_log_lines_carry_the_request_and_job_ids(capsys):
    logs.configure_logging("json", "INFO")
    logger = logging.getLogger("detox.test")
    try:
        token = logs.request_id.set("r-1")
        logger.info("inside a request", extra={"status": 200})
        logs.request_id.reset(token)
        with logs.job_context("j-9"):
            logger.warning("inside a job")
        logger.info("outside")
    finally:
        logging.getLogger().handlers = []
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [(r["message"], r["request_id"], r["job_id"]) for r in lines] == [
        ("inside a request", "r-1", None), ("inside a job", None, "j-9"), ("outside", None, None),
    ]  # fmt: skip
    assert lines[0]["status"] == 200 and lines[1]["level"] == "WARNING"
    assert {"time", "level", "logger", "message"} <= set(lines[0])


def test_a_500_is_logged_once_with_its_request_id_under_uvicorn(api_settings, session, caplog):
    """On a real uvicorn server configured as `detox api` configures it (its loggers propagate to
    ours): one record with the traceback, carrying the request id the client got."""
    import threading
    import time

    import httpx
    import uvicorn

    from app.api.main import create_app
    from tests.api.serving_app import free_port

    class BrokenBroker:
        def enqueue(self, job_id: str) -> None:
            raise RuntimeError("boom")

        def ping(self, timeout: float) -> None:
            raise RuntimeError("boom")

    caplog.handler.addFilter(logs.ContextFilter())
    caplog.set_level(logging.INFO)
    port = free_port()
    app = create_app(api_settings, broker=BrokenBroker())
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
            time.sleep(0.05)
        response = httpx.post(f"http://127.0.0.1:{port}/v1/jobs", json=dinm_body(), headers=AUTH,
                              timeout=30)  # fmt: skip
    finally:
        server.should_exit = True
        thread.join(20)
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "internal_error"
    assert "boom" not in response.text
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1, [(r.name, r.getMessage()) for r in tracebacks]
    assert tracebacks[0].request_id == response.headers["x-request-id"]
    assert "unhandled error on POST /v1/jobs" in tracebacks[0].getMessage()
