"""`detox bias` and `detox perplexity` in-process, on the tiny model saved to a folder."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from app.cli import app
from app.ml.deltas import Delta, DenseUpdate, fingerprint

CROWS_TYPES = {
    "age", "disability", "gender", "nationality", "physical-appearance", "race-color",
    "religion", "sexual-orientation", "socioeconomic",
}  # fmt: skip


def run(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def assert_one_line_error(code, stdout, stderr, message):
    assert code == 2 and stdout == ""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in stderr


def test_bias_json_per_type(tiny_model_dir):
    code, stdout, _ = run("bias", "--model", tiny_model_dir, "--limit", "2", "--json")
    assert code == 0
    report = json.loads(stdout)  # stdout carries only the report
    assert report["formula"] == "shared" and report["n"] == 18 and report["limit"] == 2
    assert report["model"] == str(tiny_model_dir) and report["delta"] is None
    assert set(report["by_type"]) == CROWS_TYPES
    for row in report["by_type"].values():
        assert row["n"] == 2 and row["score"] in (0.0, 50.0, 100.0)
        assert row["sentence_score"] in (0.0, 50.0, 100.0)
    assert 0 <= report["overall"] <= 100 and 0 <= report["sentence_overall"] <= 100


def test_bias_types_own_pairs_and_table(tiny_model_dir, tmp_path):
    code, stdout, _ = run(
        "bias", "--model", tiny_model_dir, "--types", "gender,religion", "--limit", "1", "--json"
    )
    assert code == 0 and set(json.loads(stdout)["by_type"]) == {"gender", "religion"}
    pairs = tmp_path / "mine.jsonl"
    pairs.write_text(json.dumps({"sent_more": "a b", "sent_less": "a c", "bias_type": "toy"}))
    code, stdout, _ = run("bias", "--model", tiny_model_dir, "--pairs", pairs, "--json")
    report = json.loads(stdout)
    assert code == 0 and report["pairs"] == str(pairs) and report["by_type"]["toy"]["n"] == 1
    code, stdout, _ = run("bias", "--model", tiny_model_dir, "--pairs", pairs)
    assert code == 0 and "toy" in stdout and "all" in stdout and "shared" in stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--types", "gender,colour"], "unknown bias type 'colour'"),
        (["--types", ","], "no bias type given"),
        (["--pairs", "absent.csv"], "absent.csv: no such file"),
        (["--pairs", "bad.csv"], "missing column(s) sent_less"),
        (["--delta", "junk.safetensors"], "not a detox delta"),
    ],
)
def test_bias_bad_input_exits_2_with_one_line(tiny_model_dir, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.csv").write_text(",sent_more,bias_type\n0,a,age\n")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    assert_one_line_error(*run("bias", "--model", tiny_model_dir, *args), message)


def test_perplexity_json_and_files(tiny_model_dir, tmp_path):
    code, stdout, _ = run("perplexity", "--model", tiny_model_dir, "--json")
    report = json.loads(stdout)
    assert code == 0 and report["texts"] == 40 and report["file"] is None
    assert report["perplexity"] > 1 and report["tokens"] > 1000
    txt = tmp_path / "texts.txt"
    txt.write_text("First paragraph,\nstill the first.\n\n  \nSecond one.\n")
    listed = tmp_path / "texts.json"
    listed.write_text(json.dumps(["First paragraph,\nstill the first.", "Second one."]))
    lines = tmp_path / "texts.jsonl"
    lines.write_text('{"text": "First paragraph,\\nstill the first."}\n{"text": "Second one."}\n')
    reports = []
    for path in (txt, listed, lines):
        code, stdout, _ = run("perplexity", "--model", tiny_model_dir, "--file", path, "--json")
        assert code == 0
        reports.append(json.loads(stdout))
    assert [r["texts"] for r in reports] == [2, 2, 2]
    assert len({r["perplexity"] for r in reports}) == 1  # the same two texts each time
    code, stdout, _ = run("perplexity", "--model", tiny_model_dir, "--file", txt)
    assert code == 0 and "perplexity" in stdout


def test_perplexity_with_a_delta_applied(tiny_model_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    name = "model.layers.1.mlp.down_proj.weight"
    update = DenseUpdate(torch.randn(model.get_parameter(name).shape) * 0.5)
    (tmp_path / "d.safetensors").write_bytes(
        Delta({name: update}, fingerprint(model, [name])).to_bytes()
    )
    base = run("perplexity", "--model", tiny_model_dir, "--json")
    edited = run("perplexity", "--model", tiny_model_dir, "--delta", tmp_path / "d.safetensors",
                 "--json")  # fmt: skip
    assert base[0] == edited[0] == 0
    after = json.loads(edited[1])
    assert after["delta"].endswith("d.safetensors")
    assert after["perplexity"] != json.loads(base[1])["perplexity"]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("absent.txt", None, "no such file"),
        ("empty.txt", "\n\n", "contains no text"),
        ("bad.json", '{"text": "x"}', "must be a JSON list of strings"),
        ("bad.jsonl", '{"text": "x"}\n{"body": 1}\n', "line 2: must be an object"),
        ("broken.jsonl", "{", "line 1: invalid JSON"),
    ],
)
def test_perplexity_bad_files_exit_2(tiny_model_dir, tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    code, stdout, stderr = run("perplexity", "--model", tiny_model_dir, "--file", path)
    assert_one_line_error(code, stdout, stderr, message)
