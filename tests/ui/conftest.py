"""The web playground in headless Debian Chromium (selenium), against the real service: `detox
api` (uvicorn on loopback) and a worker as processes, embedded mode (SQLite + file broker), a tiny
random model. Versions are made by real jobs, so their metrics have the shapes workers write.

Chromium and its driver come from the Debian packages `chromium` and `chromium-driver`
(`scripts/browser.sh` installs them; `scripts/test.sh` runs it). Without them, or without
selenium, these tests skip and say why. Screenshots go to `out/ui-screenshots/`.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api.serving_app import free_port

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = ROOT / "out" / "ui-screenshots"
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--window-size=1360,1000",
)  # fmt: skip
API_KEY = "ui-test-admin-key"  # the bootstrap admin key (DETOX_ADMIN_KEY) of the test service
INSTANCE: dict[str, Any] = json.loads((ROOT / "examples" / "safeedit_example.json").read_text())[0]
TERMINAL = {"succeeded", "failed", "cancelled"}


def browser_missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    if importlib.util.find_spec("selenium") is None:
        return "selenium is not installed (pip install -e '.[dev]')"
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not path.exists():
            return f"{path} is missing: install the Debian package {package} (scripts/browser.sh)"
    return None


@dataclass
class Service:
    """`detox api` + one worker, embedded mode, on a free loopback port."""

    home: Path
    model: Path
    port: int = field(default_factory=free_port)
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DETOX_")}
        return env | {
            "DETOX_HOME": str(self.home),
            "DETOX_MODEL": str(self.model),
            "DETOX_DEVICE": "cpu",
            "DETOX_TORCH_THREADS": "1",
            "DETOX_MAX_NEW_TOKENS": "16",  # long enough for a fluency score
            "DETOX_SERVING_MAX_TOKENS": "24",
            "DETOX_UNLEARN_BIAS_PAIRS_PER_TYPE": "2",
            "DETOX_ADMIN_KEY": API_KEY,
        }

    def start(self) -> None:
        for name, args in (
            ("api", ["-m", "app.cli", "api", "--port", str(self.port)]),
            ("worker", ["-m", "workers"]),
        ):
            with (self.home / f"{name}.log").open("wb") as log:
                self.procs.append(
                    subprocess.Popen(
                        [sys.executable, *args], env=self.env(), cwd=self.home, stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )  # fmt: skip
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"the API never became ready:\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(p.read_text()[-3000:] for p in sorted(self.home.glob("*.log")))

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def http(self) -> httpx.Client:
        headers = {"Authorization": f"Bearer {API_KEY}"}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)

    def run_job(self, body: dict[str, Any], timeout: float = 240) -> dict[str, Any]:
        """Submit a job and wait for it; it must succeed."""
        with self.http() as client:
            response = client.post("/v1/jobs", json=body)
            assert response.status_code == 202, response.text
            job_id = response.json()["id"]
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                job = client.get(f"/v1/jobs/{job_id}").json()
                if job["status"] in TERMINAL:
                    assert job["status"] == "succeeded", (job["error"], self.logs())
                    return job
                time.sleep(0.2)
        raise AssertionError(f"job {job_id} did not finish:\n{self.logs()}")


def dinm_job(**overrides: Any) -> dict[str, Any]:
    body = {"kind": "dinm", "parent": "base", "instance": INSTANCE, "params": {"steps": 2}}
    return body | overrides


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Service]:
    """The service with a lineage made by real jobs: base -> v1 (DINM) -> v2 (DINM) -> u3
    (unlearning), and an eval job's results attached to v1."""
    reason = browser_missing()
    if reason:
        pytest.skip(reason)
    svc = Service(tmp_path_factory.mktemp("ui-home"), tiny_model_dir)
    try:
        svc.start()
        svc.run_job(dinm_job(name="v1"))
        svc.run_job(dinm_job(name="v2", parent="v1"))
        svc.run_job({
            "kind": "unlearn", "parent": "v2", "name": "u3", "method": "masked_ga",
            "forget": [{"text": "the cat is nasty and mean", "harmful_spans": [[11, 17]]}],
            "retain": ["the sun rises in the east"],
            "params": {"steps": 2, "lr": 1e-2, "max_ppl_increase": None, "seed": 1},
        })  # fmt: skip
        svc.run_job({
            "kind": "eval", "model": "v1", "suites": ["safeedit", "bias", "perplexity"],
            "params": {"limit": 2, "bias_types": ["gender", "religion"]},
        })  # fmt: skip
        yield svc
    finally:
        svc.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Headless Debian Chromium through its own chromedriver: a fresh profile, no network
    beyond loopback, browser console and network logs kept for the assertions."""
    reason = browser_missing()
    if reason:
        pytest.skip(reason)
    os.environ.setdefault("SE_AVOID_STATS", "true")  # selenium-manager: no usage statistics
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    log = tmp_path_factory.mktemp("chromedriver") / "chromedriver.log"
    driver = webdriver.Chrome(
        service=DriverService(str(CHROMEDRIVER), log_output=str(log)), options=options
    )
    driver.set_page_load_timeout(60)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll `condition` until it returns something truthy (its value is returned)."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = condition()
            if value:
                return value
        except Exception as exc:  # an element not there yet, a stale one
            last = exc
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last error: {last})")


def screenshot(driver: Any, name: str) -> Path:
    """The whole page (not only the window) as `out/ui-screenshots/NAME.png`."""
    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
    shot = driver.execute_cdp_cmd(
        "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": clip}
    )
    path = SCREENSHOTS / f"{name}.png"
    path.write_bytes(base64.b64decode(shot["data"]))
    return path
