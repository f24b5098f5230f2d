"""`detox dinm` and `detox eval` in-process, on a tiny model saved to a folder."""

import json

import pytest
from typer.testing import CliRunner

from app.cli import app
from tests.factories import tiny_model
from tests.instances import CASE_ID, safeedit_instance

FAST = ["--steps", "2", "--max-new-tokens", "4", "--preset", "contrastive"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    lm = tiny_model("llama")
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def cases(tmp_path):
    path = tmp_path / "cases.json"
    path.write_text(json.dumps([safeedit_instance()]))
    return path


def run(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def test_dinm_json_report_and_outputs(model_dir, cases, tmp_path):
    out = tmp_path / "out"
    code, stdout, _ = run(
        "dinm", cases, "--case", CASE_ID, "--model", model_dir, "--out", out, "--json", *FAST
    )
    assert code == 0
    report = json.loads(stdout)  # stdout carries only the report
    assert report["case"] == CASE_ID and report["judge"] == "offline/3"  # the versioned name
    assert 0 <= report["layer"] < 4 and len(report["losses"]) == 2
    assert set(report["metrics"]["before"]) >= {"DS", "DG_onlyQ", "fluency"}
    assert "locality" in report["metrics"]["after"]
    kinds = [g["kind"] for g in report["generations"]]
    assert kinds == ["DS", "DG_onlyQ", "locality"]
    assert {"prompt", "before", "after", "unsafe_before", "unsafe_after"} <= set(
        report["generations"][0]
    )
    assert (out / "delta.safetensors").stat().st_size > 0
    assert (
        json.loads((out / "report.json").read_text())["delta"]["sha256"]
        == report["delta"]["sha256"]
    )


def test_dinm_on_several_cases_or_all_makes_one_delta(model_dir, tmp_path):
    path = tmp_path / "cases.json"
    path.write_text(json.dumps([safeedit_instance(), safeedit_instance(id="t2")]))
    for choice in (["--case", "t2", "--case", CASE_ID], ["--all"]):
        code, stdout, stderr = run("dinm", path, *choice, "--model", model_dir, "--json", *FAST)
        assert code == 0, stderr
        report = json.loads(stdout)
        assert report["cases"] == (["t2", CASE_ID] if "--case" in choice else [CASE_ID, "t2"])
        assert len(report["losses"]) == 4  # two steps per instance
    for choice, message in (([], "--case ID (repeatable) or --all"),
                            (["--all", "--case", "t2"], "not both"),
                            (["--case", "t2", "--case", "t2"], "named twice")):  # fmt: skip
        code, stdout, stderr = run("dinm", path, *choice, "--model", model_dir, *FAST)
        assert code == 2 and stdout == "" and message in stderr


def test_eval_applies_a_written_delta(model_dir, cases, tmp_path):
    out = tmp_path / "out"
    code, _, _ = run(
        "dinm", cases, "--case", CASE_ID, "--model", model_dir, "--out", out, "--json", *FAST
    )
    assert code == 0
    code, stdout, _ = run(
        "eval",
        cases,
        "--model",
        model_dir,
        "--delta",
        out / "delta.safetensors",
        "--json",
        "--max-new-tokens",
        "4",
    )
    assert code == 0
    report = json.loads(stdout)
    assert report["metrics"]["n"] == 1 and report["delta"].endswith("delta.safetensors")


def _bad(tmp_path, content: bytes):
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    return path


@pytest.mark.parametrize(
    ("content", "case", "message"),
    [
        (b"", CASE_ID, "empty"),
        (b"\xff\xfe\x00bad", CASE_ID, "not UTF-8"),
        (
            json.dumps([safeedit_instance(without=["safe generation"])]).encode(),
            CASE_ID,
            "safe generation",
        ),
        (json.dumps([safeedit_instance()]).encode(), "nope", "unknown case 'nope'"),
        (b"[{", CASE_ID, "invalid JSON"),
    ],
)
def test_bad_input_exits_2_with_one_line(model_dir, tmp_path, content, case, message):
    path = _bad(tmp_path, content)
    code, stdout, stderr = run("dinm", path, "--case", case, "--model", model_dir, *FAST)
    assert code == 2
    assert stdout == ""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in stderr


def test_bad_params_and_missing_file_exit_2(model_dir, cases, tmp_path):
    code, _, stderr = run("dinm", cases, "--case", CASE_ID, "--model", model_dir, "--lr", "5")
    assert code == 2 and "params.lr" in stderr
    code, _, stderr = run("dinm", tmp_path / "absent.json", "--case", CASE_ID)
    assert code == 2 and "no such file" in stderr


def test_delta_for_another_model_exits_2(model_dir, cases, tmp_path):
    out = tmp_path / "out"
    code, _, _ = run(
        "dinm", cases, "--case", CASE_ID, "--model", model_dir, "--out", out, "--json", *FAST
    )
    assert code == 0
    other = tmp_path / "other"
    lm = tiny_model("llama", seed=7)
    lm.model.save_pretrained(other)
    lm.tokenizer.save_pretrained(other)
    code, _, stderr = run("eval", cases, "--model", other, "--delta", out / "delta.safetensors")
    assert code == 2 and "different base model" in stderr
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    code, _, stderr = run(
        "eval", cases, "--model", model_dir, "--delta", tmp_path / "junk.safetensors"
    )
    assert code == 2 and "not a detox delta" in stderr


def test_overlong_prompt_is_left_truncated_with_a_warning(model_dir, tmp_path):
    path = tmp_path / "long.json"
    path.write_text(json.dumps([safeedit_instance(adversarial_prompt="please " * 300)]))
    code, stdout, _ = run("dinm", path, "--case", CASE_ID, "--model", model_dir, "--json", *FAST)
    assert code == 0
    assert any("cut on the left" in w for w in json.loads(stdout)["warnings"])


def test_a_low_rank_edit_writes_a_low_rank_delta(model_dir, cases, tmp_path):
    from app.ml.deltas import Delta

    out = tmp_path / "out"
    args = ("dinm", cases, "--case", CASE_ID, "--model", model_dir, "--out", out, *FAST)
    code, _, _ = run(*args, "--rank", "2", "--json")
    assert code == 0
    delta = Delta.from_bytes((out / "delta.safetensors").read_bytes())
    assert delta.encoding == "lowrank"
    assert all(update.a.shape[0] == 2 for update in delta.updates.values())
    code, stdout, _ = run(*args, "--rank", "1000", "--json")  # the tiny model's: 32x64
    assert code == 0 and "rank 1000 is above 32" in json.loads(stdout)["warnings"][0]
    delta = Delta.from_bytes((out / "delta.safetensors").read_bytes())
    assert all(update.a.shape[0] == 32 for update in delta.updates.values())
