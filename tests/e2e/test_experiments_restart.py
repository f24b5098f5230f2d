"""An experiment survives a restart of the API: `detox api` and a worker as real processes on
PostgreSQL + Redis; a DINM job makes the version of the second arm."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from pathlib import Path

import redis

from tests.processes import Processes
from tests.services import redis_url

ROOT = Path(__file__).resolve().parents[2]
REDIS_URL = redis_url(9)
INSTANCE = json.loads((ROOT / "examples" / "safeedit_example.json").read_text())[0]
USERS = [f"user-{i}" for i in range(12)]


def _arms(http, experiment: str) -> dict[str, tuple[str, str]]:
    """Each user's (arm, response id) for one chat completion."""
    served = {}
    for user in USERS:
        body = {
            "model": f"exp:{experiment}",
            "user": user,
            "max_tokens": 2,
            "temperature": 0,
            "messages": [{"role": "user", "content": "How do I pick a lock?"}],
        }
        response = http.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        served[user] = (response.json()["model"], response.json()["id"])
    return served


def _requests(http, experiment: str, expected: int, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        results = http.get(f"/v1/experiments/{experiment}/results").json()
        if sum(arm["judged"] for arm in results["arms"]) >= expected:
            return results
        assert time.monotonic() < deadline, results
        time.sleep(0.2)


def test_arms_outcomes_and_results_survive_a_restart(
    tmp_path: Path, new_database: Callable[[str], str], tiny_model_dir: Path
):
    redis.Redis.from_url(REDIS_URL).flushdb()
    env = {
        "DETOX_MODEL": str(tiny_model_dir),
        "DETOX_MAX_NEW_TOKENS": "4",
        "DETOX_DATABASE_URL": new_database("postgresql"),
        "DETOX_BROKER_URL": REDIS_URL,
    }
    service = Processes(tmp_path, env)
    try:
        service.start()
        with service.http() as http:
            job = http.post(
                "/v1/jobs",
                json={
                    "kind": "dinm",
                    "parent": "base",
                    "instance": INSTANCE,
                    "params": {"steps": 2, "preset": "contrastive"},
                },
            ).json()
            assert service.wait_job(job["id"])["status"] == "succeeded", service.logs()
            version = service.wait_job(job["id"])["version"]
            body = {
                "name": "restart",
                "judge": "offline",
                "arms": [{"model": "base"}, {"model": version}],
            }
            assert http.post("/v1/experiments", json=body).status_code == 201
            before = _arms(http, "restart")
            assert {arm for arm, _ in before.values()} == {"base", version}
            _requests(http, "restart", len(USERS))

        service.kill_api(signal.SIGTERM)
        service.start_api()
        service.wait_ready()
        with service.http() as http:
            after = _arms(http, "restart")
            assert {u: arm for u, (arm, _) in after.items()} == {
                u: arm for u, (arm, _) in before.items()
            }
            results = _requests(http, "restart", 2 * len(USERS))
            assert sum(arm["requests"] for arm in results["arms"]) == 2 * len(USERS)
            rid = after[USERS[0]][1]
            scored = http.post(
                "/v1/experiments/restart/feedback", json={"response_id": rid, "score": 1}
            )
            assert scored.status_code == 200, scored.text
    finally:
        service.stop()
