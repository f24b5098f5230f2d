"""`detox chat` and `detox ab` against a live server (uvicorn in a thread, tiny model)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from typer.testing import CliRunner

from app.cli.main import app
from app.settings import get_settings
from tests.api.serving_app import live_server


@pytest.fixture
def url(tmp_path, monkeypatch) -> Iterator[str]:
    with live_server(tmp_path) as (url, _app):
        monkeypatch.setenv("DETOX_URL", url)
        get_settings.cache_clear()
        yield url
    get_settings.cache_clear()


def test_chat_and_ab(url):
    runner = CliRunner()
    plain = runner.invoke(app, ["chat", "--model", "safe1", "--json", "--max-tokens", "6", "Hi"])
    assert plain.exit_code == 0, plain.output
    answer = json.loads(plain.stdout)
    text = answer["choices"][0]["message"]["content"]
    streamed = runner.invoke(app, ["chat", "--model", "safe1", "--max-tokens", "6", "Hi"])
    assert streamed.exit_code == 0, streamed.output
    assert streamed.stdout == text + "\n"

    result = runner.invoke(app, ["ab", "--arms", "base,safe1", "--max-tokens", "6", "--json", "Hi"])
    assert result.exit_code == 0, result.output
    arms = json.loads(result.stdout)["arms"]
    assert [a["model"] for a in arms] == ["base", "safe1"]
    assert arms[1]["text"] == text
    assert all(0 <= a["unsafe_score"] <= 1 for a in arms)  # the offline judge
    table = runner.invoke(app, ["ab", "--arms", "base,safe1", "--max-tokens", "4", "Hi"])
    assert table.exit_code == 0 and "safe1" in table.stdout

    missing = runner.invoke(app, ["chat", "--model", "nope", "Hi"])
    assert missing.exit_code == 2 and "nope" in missing.output
