"""Faults with the real services: PostgreSQL stopped and restarted under traffic, Redis stopped,
the API killed and restarted while a client follows a job. The servers that go down are private
ones (tests/faults/services.py), so no other test sees the outage.

What must hold: while a dependency is down, requests are refused with 503 in the error envelope
(never a 500, never a hang); the service recovers by itself; no accepted job is lost and no
version is half-written.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.store import crud
from app.store.db import make_engine, make_sessionmaker
from tests.faults.services import PrivatePostgres, PrivateRedis
from tests.instances import safeedit_instance
from tests.processes import Processes
from tests.services import ADMIN_KEY, AUTH

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(600)


def dinm(steps: int = 2, **extra: Any) -> dict[str, Any]:
    return {
        "kind": "dinm",
        "parent": "base",
        "instance": safeedit_instance(),
        "params": {"steps": steps, "preset": "contrastive"},
    } | extra


class Traffic:
    """A thread sending requests in a loop (bounded by `stop()`), recording every answer."""

    def __init__(
        self, url: str, requests: list[tuple[str, str, dict | None]], interval: float = 0.05
    ):
        self.url, self.requests, self.interval = url, requests, interval
        self.answers: list[tuple[float, str, int, dict[str, Any], dict[str, str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, headers=AUTH, timeout=30) as http:
            while not self._stop.is_set():
                for method, path, body in self.requests:
                    started = time.monotonic()
                    try:
                        response = http.request(method, path, json=body)
                        payload = response.json() if response.content else {}
                        status, headers = response.status_code, dict(response.headers)
                    except httpx.TransportError as exc:
                        status, payload, headers = -1, {"transport": str(exc)}, {}
                    self.answers.append((started, f"{method} {path}", status, payload, headers))
                self._stop.wait(self.interval)

    def since(self, moment: float) -> list[tuple[float, str, int, dict, dict]]:
        return [a for a in list(self.answers) if a[0] >= moment]


def assert_only_expected(answers: list, allowed: set[int]) -> None:
    for _, what, status, payload, headers in answers:
        assert status in allowed, (what, status, payload)
        if status == 503:
            error = payload["error"]
            assert set(error) == {"message", "type", "param", "code"}, payload
            assert error["type"] == "service_unavailable_error"
            assert headers.get("retry-after") or error["code"] == "broker_unavailable", payload


@pytest.fixture
def postgres() -> Iterator[PrivatePostgres]:
    server = PrivatePostgres()
    try:
        server.start()
        yield server
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):  # already stopped
            server.stop()
        server.remove()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_postgres_stopped_and_restarted_under_traffic(tmp_path, postgres, broker, tiny_model_dir):
    url = postgres.create_database("detox")
    service = Processes(tmp_path / "home", {
        "DETOX_DATABASE_URL": url, "DETOX_BROKER_URL": broker.url(),
        "DETOX_MODEL": str(tiny_model_dir), "DETOX_MAX_NEW_TOKENS": "4",
        "DETOX_JOB_RETRY_BACKOFF_S": "0.5", "DETOX_JOB_RETRY_BACKOFF_MAX_S": "2",
        "DETOX_JOB_HEARTBEAT_TIMEOUT_S": "10", "DETOX_AUTH_CACHE_S": "0",
        "DETOX_RATE_LIMIT_PER_MINUTE": "0",
    })  # fmt: skip
    (tmp_path / "home").mkdir()
    service.start()
    accepted: list[str] = []
    try:
        with service.http() as http:
            for _ in range(2):
                accepted.append(http.post("/v1/jobs", json=dinm(steps=40)).json()["id"])
        reads = [("GET", "/v1/versions", None), ("GET", "/v1/jobs", None)]
        with (
            Traffic(service.url, reads) as traffic,
            Traffic(service.url, [("POST", "/v1/jobs", dinm())], interval=1.0) as writes,
        ):
            time.sleep(2)
            postgres.stop()
            down_at = time.monotonic()
            time.sleep(4)
            during = traffic.since(down_at)
            postgres.start()
            up_at = time.monotonic()
            recovered_at = _first_success_after(traffic, up_at, deadline_s=30)
            time.sleep(2)
        answers = traffic.answers + writes.answers
        during += writes.since(down_at)
        assert_only_expected(answers, {200, 202, 503})
        assert any(a[2] == 503 for a in during), "no request noticed the outage"
        codes = {a[3]["error"]["code"] for a in during if a[2] == 503}
        assert codes <= {"database_unavailable"}, codes
        assert recovered_at is not None, "the API did not recover by itself"
        accepted += [a[3]["id"] for a in answers if a[2] == 202]

        # Every accepted job ends succeeded, each with one complete, verifiable version.
        jobs = [service.wait_job(job_id, timeout=300) for job_id in accepted]
        assert {j["status"] for j in jobs} == {"succeeded"}, [
            (j["id"], j["status"], j["error"]) for j in jobs if j["status"] != "succeeded"
        ]
        engine = make_engine(url)
        try:
            with make_sessionmaker(engine)() as session:
                versions = crud.list_versions(session=session)
                assert len(versions) == len(jobs)
                for version in versions:
                    blobs = crud.load_delta_blobs(session=session, version_id=version.id)
                    assert blobs, version.name  # checksums verified on read
        finally:
            engine.dispose()
    finally:
        service.stop()


def _first_success_after(traffic: Traffic, moment: float, deadline_s: float) -> float | None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if any(a[2] == 200 for a in traffic.since(moment)):
            return time.monotonic()
        time.sleep(0.1)
    return None


def test_redis_stopped_refuses_jobs_without_orphans_and_the_retry_sends_them(
    tmp_path, broker, tiny_model_dir
):
    home = tmp_path / "home"
    home.mkdir()
    service = Processes(home, {
        "DETOX_BROKER_URL": broker.url(), "DETOX_MODEL": str(tiny_model_dir),
        "DETOX_MAX_NEW_TOKENS": "4",
    })  # fmt: skip
    service.start_api()
    service.wait_ready(60, path="/healthz")
    try:
        with service.http() as http:
            broker.stop()
            refused = http.post("/v1/jobs", json=dinm(), headers={"Idempotency-Key": "k-1"})
            assert refused.status_code == 503, refused.text
            assert refused.json()["error"]["code"] == "broker_unavailable"
            assert http.get("/v1/jobs", params={"status": "queued"}).json()["data"] == []
            [failed] = http.get("/v1/jobs").json()["data"]
            assert failed["status"] == "failed"
            ready = http.get("/readyz")
            assert ready.status_code == 503 and "broker" in ready.json()["error"]["message"]
            # Reading goes on; the rate limiter, which also uses Redis, does not fail requests.
            assert http.get("/v1/versions").status_code == 200

            broker.start()
            retried = http.post("/v1/jobs", json=dinm(), headers={"Idempotency-Key": "k-1"})
            assert retried.status_code == 202 and retried.json()["id"] == failed["id"]
        service.start_worker()
        job = service.wait_job(failed["id"], timeout=240)
        assert job["status"] == "succeeded", (job["error"], service.logs())
    finally:
        service.stop()


def test_the_api_killed_and_restarted_while_a_client_watches_a_job(tmp_path, tiny_model_dir):
    home = tmp_path / "home"
    home.mkdir()
    service = Processes(home, {
        "DETOX_MODEL": str(tiny_model_dir), "DETOX_MAX_NEW_TOKENS": "4",
    })  # fmt: skip
    service.start()
    try:
        with service.http() as http:
            job = http.post("/v1/jobs", json=dinm(steps=300, name="survivor")).json()
        env = {**service.environ(), "DETOX_URL": service.url, "DETOX_API_KEY": ADMIN_KEY}
        watch = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "jobs", "watch", job["id"], "--json"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        _wait_for_progress(service, job["id"])
        service.kill_api()  # SIGKILL mid-stream: the worker goes on
        time.sleep(1)
        service.start_api()
        service.wait_ready(120)
        out, err = watch.communicate(timeout=300)
        assert watch.returncode == 0, (err, service.logs())
        final = json.loads(out)
        assert final["status"] == "succeeded" and final["version"] == "survivor"
        with service.http() as http:
            version = http.get("/v1/versions/survivor").json()
        assert version["job_id"] == job["id"] and version["delta"]["params"]
    finally:
        service.stop()


def _wait_for_progress(service: Processes, job_id: str) -> None:
    deadline = time.monotonic() + 120
    with service.http() as http:
        while time.monotonic() < deadline:
            job = http.get(f"/v1/jobs/{job_id}").json()
            if job["status"] == "running" and job["progress"] > 0:
                return
            assert job["status"] in ("queued", "running"), job
            time.sleep(0.1)
    raise AssertionError(f"the job never made progress:\n{service.logs()}")


def test_an_experiment_serves_through_a_database_outage_and_records_it_after(
    tmp_path, postgres, broker, tiny_model_dir
):
    from app.ml.models import load_model
    from tests.serving.conftest import random_delta, store_version

    url = postgres.create_database("detox")
    home = tmp_path / "home"
    home.mkdir()
    service = Processes(home, {
        "DETOX_DATABASE_URL": url, "DETOX_BROKER_URL": broker.url(),
        "DETOX_MODEL": str(tiny_model_dir), "DETOX_RATE_LIMIT_PER_MINUTE": "0",
    })  # fmt: skip
    service.start_api()
    service.wait_ready(60, path="/healthz")
    engine = make_engine(url)
    try:
        lm = load_model(str(tiny_model_dir), device="cpu")
        store_version(make_sessionmaker(engine), lm, random_delta(lm, layer=1, seed=1), name="v1")
        with service.http() as http:
            body = {"name": "e1", "judge": "offline", "arms": [{"model": "base"}, {"model": "v1"}]}
            assert http.post("/v1/experiments", json=body).status_code == 201

            def ask(user: str) -> httpx.Response:
                return http.post("/v1/chat/completions", json={
                    "model": "exp:e1", "user": user, "max_tokens": 2,
                    "messages": [{"role": "user", "content": "Hi"}]})  # fmt: skip

            warm, served = 0, set()
            while served != {"base", "v1"}:  # both arms loaded before the outage
                answer = ask(f"warm-{warm}")
                assert answer.status_code == 200 and warm < 40, (answer.text, service.logs())
                served.add(answer.json()["model"])
                warm += 1
            postgres.stop()
            during = [ask(f"user-{i}") for i in range(6)]
            assert [r.status_code for r in during] == [200] * 6, [r.text for r in during]
            time.sleep(2)
            postgres.start()
            deadline = time.monotonic() + 60
            while True:
                response = http.get("/v1/experiments/e1/results")
                if response.status_code == 200:
                    arms = response.json()["arms"]
                    if sum(a["judged"] for a in arms) == warm + 6:
                        break
                assert time.monotonic() < deadline, (response.text, service.logs())
                time.sleep(0.5)
            assert sum(a["requests"] for a in arms) == warm + 6  # nothing lost, nothing twice
    finally:
        engine.dispose()
        service.stop()
