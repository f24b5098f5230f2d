"""`detox up` on a fresh DETOX_HOME with a tiny model: API + worker, one job end to end through
the CLI, then SIGTERM stops both processes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tests.api.conftest import closed_port
from tests.cli.servers import ROOT, _env
from tests.instances import CASE_ID, safeedit_instance


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_ready(url: str, proc: subprocess.Popen, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert proc.poll() is None, "detox up exited early"
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    pytest.fail(f"detox up not ready in {seconds} s")


def test_up_runs_a_job_and_stops_cleanly_on_sigterm(tmp_path, tiny_model_dir):
    port = closed_port()
    url = f"http://127.0.0.1:{port}"
    home = tmp_path / "home"
    env = _env(DETOX_HOME=str(home), DETOX_MODEL=str(tiny_model_dir), DETOX_MAX_NEW_TOKENS="4")
    del env["DETOX_ADMIN_KEY"], env["DETOX_API_KEY"]  # a first start as a user makes it
    log = (tmp_path / "up.log").open("w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "up", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        _wait_ready(url, proc, 60)
        log.seek(0)
        printed = re.findall(r"export DETOX_API_KEY=(dtx_\S+)", log.read())
        assert len(printed) == 1, "the first start prints one admin key"
        key = printed[0]
        assert httpx.get(f"{url}/v1/versions", timeout=10).status_code == 401
        cases = tmp_path / "cases.json"
        cases.write_text(json.dumps([safeedit_instance()]))
        client_env = _env(DETOX_URL=url, DETOX_API_KEY=key)
        del client_env["DETOX_ADMIN_KEY"]
        done = subprocess.run(
            [sys.executable, "-m", "app.cli", "jobs", "submit", cases, "--case", CASE_ID,
             "--params", '{"steps": 2, "preset": "contrastive"}', "--watch", "--json"],
            cwd=ROOT, env=client_env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        job = json.loads(done.stdout)
        assert job["status"] == "succeeded" and job["version"] == "v1"
        assert (home / "detox.db").is_file()  # all state under DETOX_HOME
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=40)
        log.seek(0)
        output = log.read()
    worker_pid = int(re.search(r"worker pid (\d+)", output).group(1))
    deadline = time.monotonic() + 5
    while _alive(worker_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(worker_pid), output


def test_up_refuses_a_public_address_without_authentication(tmp_path):
    env = _env(DETOX_HOME=str(tmp_path / "home"), DETOX_AUTH="false")
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", "up", "--host", "0.0.0.0", "--port", "1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert "refusing to listen on 0.0.0.0 with authentication disabled" in done.stderr
    assert not (tmp_path / "home" / "detox.db").exists()  # refused before anything was made


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("localhost", True), ("::1", True), ("[::1]", True),
     ("127.8.0.1", True), ("0.0.0.0", False), ("10.1.2.3", False), ("example.org", False)],
)  # fmt: skip
def test_loopback_addresses(host, loopback):
    from app.cli.service import is_loopback

    assert is_loopback(host) is loopback
