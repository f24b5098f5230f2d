"""`detox unlearn` in-process, on the tiny model saved to a folder."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from app.cli import app

FORGET = (
    '{"text": "the cat is nasty and mean", "harmful_spans": [[11, 17]]}\n'
    '{"text": "dogs are stupid animals", "harmful_spans": [[9, 15]]}\n'
)
FAST = ["--steps", "3", "--bias-pairs", "1"]


def run(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def forget(tmp_path):
    path = tmp_path / "forget.jsonl"
    path.write_text(FORGET)
    return path


def test_unlearn_json_report_and_a_delta_that_reproduces_it(tiny_model_dir, forget, tmp_path):
    out = tmp_path / "out"
    code, stdout, _ = run(
        "unlearn", forget, "--model", tiny_model_dir, "--out", out, "--json", *FAST,
        "--params", '{"max_ppl_increase": null, "layers": [0, 1], "lr": 0.01}',
    )  # fmt: skip
    assert code == 0
    report = json.loads(stdout)  # stdout carries only the report
    assert report["method"] == "masked_ga" and report["scope"] == "lora"
    assert report["steps"] == 3 and report["stopped"] == "steps" and len(report["history"]) == 3
    assert report["forget_nll"]["after"] > report["forget_nll"]["before"]  # it ascended
    assert report["forget_documents"] == 2 and report["forget_tokens"] > 0
    before, after = report["metrics"]["before"], report["metrics"]["after"]
    assert before["bias"]["n"] == after["bias"]["n"] == 9  # one pair of each CrowS-Pairs type
    assert report["delta"]["path"] == str(out / "delta.safetensors")
    assert json.loads((out / "report.json").read_text())["steps"] == 3

    # The written delta, applied by another command, gives the report's "after" perplexity.
    code, stdout, _ = run(
        "perplexity", "--model", tiny_model_dir, "--delta", out / "delta.safetensors", "--json"
    )
    assert code == 0
    assert json.loads(stdout)["perplexity"] == pytest.approx(after["perplexity"]["perplexity"])
    assert after["perplexity"]["perplexity"] != before["perplexity"]["perplexity"]


def test_unlearn_table_names_the_stop_and_the_metrics(tiny_model_dir, forget):
    code, stdout, _ = run("unlearn", forget, "--model", tiny_model_dir, "--method", "ga", *FAST)
    assert code == 0
    assert "forget_nll" in stdout and "reference perplexity" in stdout and "bias" in stdout


@pytest.mark.parametrize(
    ("content", "args", "message"),
    [
        ('{"text": "ok"}\n{"text": "x", "harmful_spans": [[0, 9]]}\n', [], "line 2"),
        ("", [], "holds no document"),
        (FORGET, ["--method", "forget-all"], "--method"),
        (FORGET, ["--params", '{"lr": -1}'], "lr"),
        (FORGET, ["--params", '{"layers": [99]}'], "layer"),
    ],
)
def test_bad_input_exits_2_with_one_line(tiny_model_dir, tmp_path, content, args, message):
    path = tmp_path / "forget.jsonl"
    path.write_text(content)
    code, stdout, stderr = run("unlearn", path, "--model", tiny_model_dir, *FAST, *args)
    assert code == 2 and stdout == "" and "Traceback" not in stderr
    # One error line; only a check that needs the model (its layers) comes after its loading.
    errors = [line for line in stderr.splitlines() if line.strip() and "loading model" not in line]
    assert len(errors) == 1 and errors[0].startswith("error:") and message in errors[0]
