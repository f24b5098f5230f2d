"""`detox versions export` against a live server (uvicorn in a thread, a tiny GPT-2 folder and its
version `safe1`): each format lands on disk and, loaded back, answers as the server does."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
import torch
from peft import PeftModel
from typer.testing import CliRunner

from app.cli.main import app
from app.ml.deltas import Delta, apply_deltas
from app.settings import get_settings
from tests.api.serving_app import live_server
from tests.services import AUTH

PROMPT = "Hello there"


@pytest.fixture
def url(tmp_path, monkeypatch) -> Iterator[str]:
    with live_server(tmp_path) as (url, _app):
        monkeypatch.setenv("DETOX_URL", url)
        get_settings.cache_clear()
        yield url
    get_settings.cache_clear()


def greedy_text(model: torch.nn.Module, tokenizer, max_tokens: int = 12) -> str:
    ids, new = tokenizer(PROMPT)["input_ids"], []
    with torch.no_grad():
        for _ in range(max_tokens):
            token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            new.append(token)
            ids.append(token)
    return tokenizer.decode(new, skip_special_tokens=True)


def served_text(url: str, model: str) -> str:
    body = {"model": model, "prompt": PROMPT, "temperature": 0, "max_tokens": 12}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=60, headers=AUTH)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def test_every_format_lands_on_disk_and_answers_as_served(url, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    runner = CliRunner()
    expected = served_text(url, "safe1")
    assert expected != served_text(url, "base")
    base_folder = tmp_path / "tiny-model"  # what the server loaded (live_server's folder)
    tokenizer = AutoTokenizer.from_pretrained(base_folder)

    adapter = tmp_path / "adapter"
    done = runner.invoke(
        app, ["versions", "export", "safe1", "--format", "peft", "--out", str(adapter), "--json"]
    )
    assert done.exit_code == 0, done.output
    summary = json.loads(done.stdout)
    assert summary["files"] == [
        "adapter_config.json", "adapter_model.safetensors", "detox_export.json"
    ]  # fmt: skip
    assert summary["report"]["version"] == "safe1" and summary["report"]["rel_error"] <= 1e-3
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_folder), adapter
    )
    assert greedy_text(peft_model, tokenizer) == expected

    merged = tmp_path / "merged"
    done = runner.invoke(app, ["versions", "export", "latest", "--format", "merged", "--out",
                               str(merged)])  # fmt: skip
    assert done.exit_code == 0, done.output
    assert "exported safe1 as merged" in done.stdout
    model = AutoModelForCausalLM.from_pretrained(merged)
    assert greedy_text(model, AutoTokenizer.from_pretrained(merged)) == expected

    delta_file = tmp_path / "out" / "safe1.safetensors"
    done = runner.invoke(app, ["versions", "export", "safe1", "--format", "delta", "--out",
                               str(delta_file), "--json"])  # fmt: skip
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["report"]["chain"][0]["name"] == "safe1"
    fresh = AutoModelForCausalLM.from_pretrained(base_folder)
    apply_deltas(fresh, [Delta.from_bytes(delta_file.read_bytes())])
    assert greedy_text(fresh, tokenizer) == expected
    assert not list(delta_file.parent.glob("*.part"))


def test_bad_input_is_one_line_and_exit_2(url, tmp_path):
    served_text(url, "base")  # the server's model is loaded (its progress bar is not ours)
    runner = CliRunner()
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    cases = [
        (["safe1", "--format", "zip", "--out", str(tmp_path / "a")], "--format"),
        (["safe1", "--format", "peft", "--out", str(full)], "not an empty folder"),
        (["safe1", "--format", "delta", "--out", str(full)], "is a folder"),
        (["nope", "--format", "peft", "--out", str(tmp_path / "b")], "no version named 'nope'"),
        (["safe1", "--format", "peft", "--max-rank", "1", "--out", str(tmp_path / "c")],
         "max_rank"),
    ]  # fmt: skip
    for args, message in cases:
        done = runner.invoke(app, ["versions", "export", *args])
        assert done.exit_code == 2, (args, done.output)
        assert message in done.stderr and done.stderr.strip().count("\n") == 0, done.stderr
        assert done.stdout == ""
    assert (full / "keep.txt").read_text() == "mine"
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()  # nothing left
