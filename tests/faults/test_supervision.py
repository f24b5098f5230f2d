"""`detox up` supervising its worker, with real processes and signals: a worker killed mid-job is
restarted while the API goes on serving (`/readyz` names the missing worker meanwhile) and its job
is requeued by the new worker; `up` itself SIGKILLed leaves no worker behind, busy or not."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api.conftest import closed_port
from tests.cli.servers import ROOT, _env
from tests.instances import safeedit_instance
from tests.services import AUTH

pytestmark = pytest.mark.timeout(600)

# A job that runs for minutes on the tiny model (with DETOX_MAX_NEW_TOKENS=32): thousands of
# generations to judge.
LONG_JOB = {
    "kind": "eval",
    "suites": ["safeedit"],
    "params": {"instances": [safeedit_instance()] * 1000},
}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (killed, not yet reaped by its parent) is gone too
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _wait(predicate: Any, timeout: float, what: str, logs: Any = lambda: "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"{what} within {timeout} s\n{logs()}")


class Up:
    def __init__(self, proc: subprocess.Popen, url: str, log: Path):
        self.proc, self.url, self.log = proc, url, log
        self.http = httpx.Client(base_url=url, headers=AUTH, timeout=30)

    def logs(self) -> str:
        return self.log.read_text(errors="replace")[-6000:]

    def ready(self) -> httpx.Response | None:
        try:
            return self.http.get("/readyz")
        except httpx.TransportError:
            return None

    def worker_pid(self) -> int | None:
        """The running worker's pid, as `/readyz` reports it (None: no worker runs now)."""
        ready = self.ready()
        if ready is None or ready.status_code != 200:
            return None
        found = re.search(r"pid (\d+)", ready.json()["checks"]["worker"]["detail"])
        return int(found.group(1)) if found else None

    def job(self, job_id: str) -> dict[str, Any]:
        return self.http.get(f"/v1/jobs/{job_id}").json()


@contextmanager
def detox_up(tmp_path: Path, model: Path, **env: str) -> Iterator[Up]:
    port = closed_port()
    log = tmp_path / "up.log"
    environ = _env(
        DETOX_HOME=str(tmp_path / "home"), DETOX_MODEL=str(model), DETOX_MAX_NEW_TOKENS="32",
        DETOX_DEVICE="cpu", DETOX_TORCH_THREADS="1", DETOX_RATE_LIMIT_PER_MINUTE="0", **env,
    )  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "up", "--port", str(port)],
            cwd=ROOT, env=environ, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    up = Up(proc, f"http://127.0.0.1:{port}", log)
    try:
        _wait(lambda: proc.poll() is None and up.worker_pid(), 90, "not ready", up.logs)
        yield up
    finally:
        up.http.close()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)


def _running(up: Up, job_id: str, attempts: int) -> bool:
    job = up.job(job_id)
    assert job["status"] in ("queued", "running"), job
    return job["status"] == "running" and job["attempts"] == attempts


def test_a_killed_worker_is_restarted_and_its_job_requeued_while_the_api_serves(
    tmp_path, tiny_model_dir
):
    with detox_up(
        tmp_path, tiny_model_dir,
        DETOX_WORKER_RESTART_BACKOFF_S="3", DETOX_JOB_HEARTBEAT_TIMEOUT_S="4",
    ) as up:  # fmt: skip
        first = up.worker_pid()
        job = up.http.post("/v1/jobs", json=LONG_JOB).json()
        _wait(lambda: _running(up, job["id"], 1), 120, "the job never ran", up.logs)

        os.kill(first, signal.SIGKILL)
        missing = _wait(
            lambda: (r := up.ready()) is not None and r.status_code == 503 and r,
            10, "/readyz never said the worker is missing", up.logs,
        )  # fmt: skip
        error = missing.json()["error"]
        assert error["code"] == "not_ready" and "worker" in error["message"], error
        assert missing.json()["checks"]["worker"]["ok"] is False
        # Meanwhile the API serves: health, reads and generation.
        assert up.http.get("/healthz").status_code == 200
        assert up.http.get(f"/v1/jobs/{job['id']}").status_code == 200
        answer = up.http.post("/v1/completions", json={"model": "base", "prompt": "Hi",
                                                       "max_tokens": 2})  # fmt: skip
        assert answer.status_code == 200, answer.text

        second = _wait(up.worker_pid, 60, "no new worker", up.logs)
        assert second != first and up.proc.poll() is None
        # The new worker's reaper requeues the dead worker's job; it runs again.
        _wait(lambda: _running(up, job["id"], 2), 120, "the job was not requeued", up.logs)
        assert up.http.post(f"/v1/jobs/{job['id']}/cancel").status_code == 200
        _wait(lambda: up.job(job["id"])["status"] == "cancelled", 60, "not cancelled", up.logs)


def test_a_busy_worker_does_not_outlive_a_killed_up(tmp_path, tiny_model_dir):
    with detox_up(tmp_path, tiny_model_dir) as up:
        worker = up.worker_pid()
        job = up.http.post("/v1/jobs", json=LONG_JOB).json()
        _wait(lambda: _running(up, job["id"], 1), 120, "the job never ran", up.logs)
        try:
            up.proc.send_signal(signal.SIGKILL)
            up.proc.wait(timeout=10)
            _wait(lambda: not _alive(worker), 10, "the worker outlived `detox up`", up.logs)
        finally:
            if _alive(worker):
                os.kill(worker, signal.SIGKILL)


def test_a_crash_looping_worker_is_restarted_with_a_doubling_capped_backoff(caplog):
    from app.cli.supervisor import WorkerSupervisor

    caplog.set_level(logging.WARNING, logger="app.cli.supervisor")
    crash = [sys.executable, "-c", "import sys; sys.exit(3)"]
    supervisor = WorkerSupervisor(crash, dict(os.environ), backoff_s=0.1, backoff_max_s=0.4)
    supervisor.start()
    try:
        _wait(lambda: supervisor.restarts >= 4, 60, "not restarted 4 times")
        missing = _wait(lambda: (c := supervisor.check()).ok is False and c, 10, "never missing")
        assert "worker exited (status 3)" in missing.detail
    finally:
        supervisor.stop()
    delays = [
        float(m.group(1))
        for r in caplog.records
        if (m := re.search(r"exited with status 3; restarting it in ([\d.]+) s", r.getMessage()))
    ]
    assert delays[:4] == [0.1, 0.2, 0.4, 0.4], delays
