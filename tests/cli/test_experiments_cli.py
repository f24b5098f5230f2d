"""`detox experiments` and `detox chat --user` against a live server (uvicorn in a thread, a
tiny model saved as DETOX_MODEL, one version `safe1`, the offline judge)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
from typer.testing import CliRunner

from app.cli.main import app
from app.settings import get_settings
from tests.api.serving_app import live_server


@pytest.fixture
def served(tmp_path, monkeypatch) -> Iterator[object]:
    with live_server(tmp_path) as (url, api_app):
        monkeypatch.setenv("DETOX_URL", url)
        get_settings.cache_clear()
        yield api_app
    get_settings.cache_clear()


def run(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.stdout


def test_create_route_results_feedback_and_stop(served):
    made = run(
        "experiments", "create", "cli1", "--arm", "base=1", "--arm", "safe1=3", "--judge", "offline"
    )
    assert made.strip().endswith("exp:cli1")
    listed = json.loads(run("experiments", "list", "--json"))["data"]
    assert [(e["name"], e["status"]) for e in listed] == [("cli1", "running")]
    assert listed[0]["arms"] == [{"model": "base", "weight": 1.0}, {"model": "safe1", "weight": 3}]

    answers = [
        json.loads(
            run(
                "chat",
                "--model",
                "exp:cli1",
                "--user",
                f"u{i}",
                "--max-tokens",
                "3",
                "--json",
                "Hi",
            )
        )
        for i in range(8)
    ]
    again = json.loads(
        run("chat", "--model", "exp:cli1", "--user", "u0", "--max-tokens", "3", "--json", "Hi")
    )
    assert again["model"] == answers[0]["model"]
    deadline = time.monotonic() + 30
    while True:  # outcomes are stored, then judged, in the background
        report = json.loads(run("experiments", "results", "cli1", "--json"))
        if sum(arm["judged"] for arm in report["arms"]) == 9 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert sum(arm["requests"] for arm in report["arms"]) == 9
    assert sum(arm["judged"] for arm in report["arms"]) == 9
    table = run("experiments", "results", "cli1")
    assert (
        "safe1 - base: unsafe" in table
        and "wilson" in CliRunner().invoke(app, ["experiments", "results", "cli1"]).output
    )

    assert "recorded 1" in run("experiments", "feedback", "cli1", answers[0]["id"], "1")
    assert "now serves safe1" in run("experiments", "stop", "cli1", "--winner", "safe1")
    assert json.loads(run("experiments", "show", "cli1"))["serves"] == "safe1"

    bad = CliRunner().invoke(app, ["experiments", "create", "x", "--arm", "base=lots"])
    assert bad.exit_code == 2 and "weight must be a number" in bad.output
    missing = CliRunner().invoke(
        app, ["experiments", "create", "x", "--arm", "base", "--arm", "nope"]
    )
    assert missing.exit_code == 2 and "nope" in missing.output
    again_stop = CliRunner().invoke(app, ["experiments", "stop", "cli1"])
    assert again_stop.exit_code != 0 and "stopped already" in again_stop.output
