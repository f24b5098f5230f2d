"""The demo model: cache path logic (fast, with fakes) and the real model (slow)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from app.ml import demo
from app.ml.demo import DEMO_NAME, default_cache_dir, demo_model_dir
from app.ml.models import LoadedModel, load_model
from app.ml.prompts import chat_text, encode_prompt


def _no_download(*_args, **_kwargs):
    raise AssertionError("the demo model must not be fetched again")


def _fake_fetch(monkeypatch, calls: list[Path]) -> None:
    """Replace the download and the GGUF conversion by something that writes a config.json."""

    def download(work: Path) -> Path:
        gguf = work / "fake.gguf"
        gguf.write_bytes(b"GGUF")
        return gguf

    def convert(gguf: Path, out: Path) -> None:
        calls.append(gguf)
        out.mkdir()
        (out / "config.json").write_text('{"model_type": "llama"}')

    monkeypatch.setattr(demo, "_download_gguf", download)
    monkeypatch.setattr(demo, "_convert_gguf", convert)


def test_default_cache_dir():
    assert default_cache_dir() == Path.home() / ".cache" / "detox"


def test_existing_copy_is_returned_without_downloading(tmp_path, monkeypatch):
    target = tmp_path / "models" / DEMO_NAME
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    monkeypatch.setattr(demo, "_fetch_and_convert", _no_download)
    monkeypatch.setattr(demo, "_download_gguf", _no_download)
    assert demo_model_dir(tmp_path) == target
    assert demo_model_dir(str(tmp_path)) == target  # type: ignore[arg-type]


def test_first_use_converts_once_into_place(tmp_path, monkeypatch):
    calls: list[Path] = []
    _fake_fetch(monkeypatch, calls)
    target = demo_model_dir(tmp_path)
    assert target == tmp_path / "models" / DEMO_NAME
    assert (target / "config.json").is_file()
    assert len(calls) == 1
    assert not list((tmp_path / "models").glob(".convert-*"))  # the staging folder is gone
    assert demo_model_dir(tmp_path) == target
    assert len(calls) == 1


def test_a_half_written_copy_is_replaced(tmp_path, monkeypatch):
    stale = tmp_path / "models" / DEMO_NAME
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"partial")  # no config.json: unfinished
    calls: list[Path] = []
    _fake_fetch(monkeypatch, calls)
    target = demo_model_dir(tmp_path)
    assert len(calls) == 1
    assert sorted(p.name for p in target.iterdir()) == ["config.json"]


def test_a_failed_conversion_leaves_nothing_behind(tmp_path, monkeypatch):
    def broken(_gguf: Path, out: Path) -> None:
        out.mkdir()
        (out / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("conversion failed")

    _fake_fetch(monkeypatch, [])
    monkeypatch.setattr(demo, "_convert_gguf", broken)
    with pytest.raises(RuntimeError, match="conversion failed"):
        demo_model_dir(tmp_path)
    models = tmp_path / "models"
    assert not (models / DEMO_NAME).exists()
    assert not list(models.glob(".convert-*"))


# -- the real model ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_model() -> LoadedModel:
    return load_model("demo", device="cpu")


@pytest.mark.slow
def test_demo_model_loads(demo_model):
    assert demo_model.name == "demo"
    assert demo_model.adapter.family == "llama"
    assert demo_model.adapter.num_layers == 30
    assert demo_model.model.config.model_type == "llama"
    assert demo_model.tokenizer.chat_template
    assert demo_model.tokenizer.pad_token is not None
    assert not demo_model.model.training
    assert not any(p.requires_grad for p in demo_model.model.parameters())
    assert demo_model.context_length == 8192


@pytest.mark.slow
def test_demo_is_converted_only_once(demo_model, monkeypatch):
    target = demo_model_dir()
    config = target / "config.json"
    before = config.stat().st_mtime_ns
    monkeypatch.setattr(demo, "_fetch_and_convert", _no_download)
    assert demo_model_dir() == target
    assert config.stat().st_mtime_ns == before
    assert not list(target.parent.glob(".convert-*"))


@pytest.mark.slow
def test_demo_knows_the_capital_of_france(demo_model):
    tokenizer = demo_model.tokenizer
    prompt = encode_prompt(tokenizer, chat_text(tokenizer, "What is the capital of France?"))
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = demo_model.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=20,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    answer = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer
