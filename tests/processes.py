"""The service as real processes: `detox api` on a free loopback port and workers, each logging
to a file under `home`. Used by the end-to-end, browser and fault tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import httpx

from app.cli.client import DetoxClient
from tests.services import ADMIN_KEY, AUTH

TERMINAL = {"succeeded", "failed", "cancelled"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Processes:
    """`env` holds the DETOX_ settings of this service; nothing else from the caller's
    environment starting with DETOX_ reaches the processes."""

    home: Path
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    api: subprocess.Popen | None = None
    workers: list[subprocess.Popen] = field(default_factory=list)
    log_prefix: str = ""  # tells apart the logs of two services sharing one home
    _starts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def environ(self) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith("DETOX_")}
        return (
            base
            | {
                "DETOX_HOME": str(self.home),
                "DETOX_DEVICE": "cpu",
                "DETOX_TORCH_THREADS": "1",
                "DETOX_ADMIN_KEY": ADMIN_KEY,
            }
            | self.env
        )

    def _spawn(self, name: str, *args: str) -> subprocess.Popen:
        self._starts += 1
        log = self.home / f"{self.log_prefix}{self._starts:02d}-{name}.log"
        with log.open("wb") as out:
            return subprocess.Popen(
                [sys.executable, *args], env=self.environ(), cwd=self.home, stdout=out,
                stderr=subprocess.STDOUT,
            )  # fmt: skip

    def start(self, *, workers: int = 1, ready_timeout: float = 120) -> Processes:
        self.start_api()
        for _ in range(workers):
            self.start_worker()
        self.wait_ready(ready_timeout)
        return self

    def start_api(self) -> None:
        self.api = self._spawn("api", "-m", "app.cli", "api", "--port", str(self.port))

    def start_worker(self) -> subprocess.Popen:
        worker = self._spawn("worker", "-m", "workers")
        self.workers.append(worker)
        return worker

    def kill_api(self, sig: int = signal.SIGKILL) -> None:
        assert self.api is not None
        self.api.send_signal(sig)
        self.api.wait(timeout=30)
        self.api = None

    def wait_ready(self, timeout: float = 120, path: str = "/readyz") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.api is not None and self.api.poll() is None, (
                "the API exited:\n" + self.logs()
            )
            try:
                if httpx.get(f"{self.url}{path}", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"the API never became ready:\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
            for p in sorted(self.home.glob("*.log"))
        )

    def stop(self) -> None:
        """Teardown: the API stops gracefully, the workers are killed. A worker's warm shutdown
        idles 2-4 s in Celery's broker loop, then unloads torch: 3-6 s a stop, and nothing a
        test checks comes after it (a graceful stop has its own test: tests/cli/test_up.py)."""
        procs = [p for p in [self.api, *self.workers] if p is not None]
        if self.api is not None:
            self.api.terminate()
        for worker in self.workers:
            worker.kill()
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.api, self.workers = None, []
        if "client" in self.__dict__:
            self.__dict__.pop("client").close()

    def http(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=AUTH, timeout=60, **kwargs)

    @cached_property
    def client(self) -> DetoxClient:
        """The CLI's HTTP client on this service (closed by `stop()`)."""
        return DetoxClient(self.url, api_key=ADMIN_KEY)

    def wait_job(self, job_id: str, timeout: float = 240) -> dict[str, Any]:
        """The job's JSON once it has finished (whatever its status)."""
        deadline = time.monotonic() + timeout
        job: dict[str, Any] = {}
        with self.http() as http:
            while time.monotonic() < deadline:
                response = http.get(f"/v1/jobs/{job_id}")
                if response.status_code == 200:
                    job = response.json()
                    if job["status"] in TERMINAL:
                        return job
                time.sleep(0.2)
        raise AssertionError(f"job {job_id} did not finish: {job}\n{self.logs()}")
