"""A live `detox api` subprocess for the CLI tests, and the CLI run as a subprocess against it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.api.conftest import closed_port
from tests.services import ADMIN_KEY, redis_url

ROOT = Path(__file__).resolve().parents[2]
BROKER_URL = redis_url(7)


def _env(**extra: str) -> dict[str, str]:
    """The environment without any DETOX_ setting but the test suite's admin key (the server's
    bootstrap key and the clients' key), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DETOX_")}
    return env | {"DETOX_ADMIN_KEY": ADMIN_KEY, "DETOX_API_KEY": ADMIN_KEY} | extra


@contextmanager
def running_api(home: Path, **env: str) -> Iterator[str]:
    """`detox api` on a free loopback port (SQLite under `home`, the Redis broker); its URL."""
    port = closed_port()
    url = f"http://127.0.0.1:{port}"
    environ = _env(DETOX_HOME=str(home), DETOX_BROKER_URL=BROKER_URL, **env)
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "api", "--port", str(port)],
        cwd=ROOT, env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                pytest.fail(f"detox api exited: {proc.stdout.read() if proc.stdout else ''}")
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("detox api did not come up in 30 s")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def detox(url: str, *args: object, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *map(str, args)],
        cwd=ROOT,
        env=_env(DETOX_URL=url, **env),
        capture_output=True,
        text=True,
        timeout=60,
    )
