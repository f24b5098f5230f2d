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
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.processes import Processes
from tests.services import ADMIN_KEY

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = ROOT / "out" / "ui-screenshots"
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--window-size=1360,1000",
)  # fmt: skip
API_KEY = ADMIN_KEY  # the service's bootstrap admin key (DETOX_ADMIN_KEY)
INSTANCE: dict[str, Any] = json.loads((ROOT / "examples" / "safeedit_example.json").read_text())[0]


def browser_missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    if importlib.util.find_spec("selenium") is None:
        return "selenium is not installed (pip install -e '.[dev]')"
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not path.exists():
            return f"{path} is missing: install the Debian package {package} (scripts/browser.sh)"
    return None


class Service(Processes):
    """`detox api` + one worker, embedded mode, with a tiny model."""

    def run_job(self, body: dict[str, Any], timeout: float = 240) -> dict[str, Any]:
        """Submit a job and wait for it; it must succeed."""
        with self.http() as client:
            response = client.post("/v1/jobs", json=body)
            assert response.status_code == 202, response.text
        job = self.wait_job(response.json()["id"], timeout)
        assert job["status"] == "succeeded", (job["error"], self.logs())
        return job


def dinm_job(**overrides: Any) -> dict[str, Any]:
    params = {"steps": 2, "preset": "contrastive"}
    body = {"kind": "dinm", "parent": "base", "instance": INSTANCE, "params": params}
    return body | overrides


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Service]:
    """The service with a lineage made by real jobs: base -> v1 (DINM) -> v2 (DINM) -> u3
    (unlearning), and an eval job's results attached to v1."""
    reason = browser_missing()
    if reason:
        pytest.skip(reason)
    env = {
        "DETOX_MODEL": str(tiny_model_dir),
        "DETOX_MAX_NEW_TOKENS": "16",  # long enough for a fluency score
        "DETOX_SERVING_MAX_TOKENS": "24",
        "DETOX_UNLEARN_BIAS_PAIRS_PER_TYPE": "2",
    }
    svc = Service(tmp_path_factory.mktemp("ui-home"), env)
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
