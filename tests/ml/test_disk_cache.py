"""The null-space basis kept on disk: a new process reads it back instead of rebuilding it, and a
corrupt or foreign file, or changed weights, are rebuilt."""

from __future__ import annotations

import pytest
import torch

from app.ml import null_space
from app.ml.dinm_objective import benign_retain_set
from app.ml.disk_cache import content_key, load_tensor, save_tensor
from app.ml.prompts import chat_text, encode_prompt_answer
from tests.factories import tiny_model

LAYER, ENERGY = 1, 0.9


def _fresh(tmp_path):
    """A model as a new process has it: same weights, nothing kept in memory."""
    lm = tiny_model("llama")
    lm.cache_dir = tmp_path
    return lm


def _pairs(lm):
    return [
        encode_prompt_answer(lm.tokenizer, chat_text(lm.tokenizer, p), a, max_length=64)
        for p, a in benign_retain_set()[:6]
    ]


def _basis(lm):
    return null_space.benign_directions(lm, LAYER, _pairs(lm), ENERGY)


@pytest.fixture
def no_rebuild(monkeypatch):
    def refuse(*_args):
        raise AssertionError("the basis was rebuilt")

    return lambda: monkeypatch.setattr(null_space, "benign_inputs", refuse)


def test_a_new_process_reads_the_basis_back(tmp_path, no_rebuild):
    built = _basis(_fresh(tmp_path))
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    no_rebuild()
    assert torch.equal(_basis(_fresh(tmp_path)), built)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "foreign"])
def test_a_corrupt_or_foreign_file_is_rebuilt_not_trusted(tmp_path, damage):
    built = _basis(_fresh(tmp_path))
    (path,) = tmp_path.glob("*.safetensors")
    if damage == "garbage":
        path.write_bytes(b"\x00" * 64)
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:-7])
    else:  # a valid file, of another key, under this name
        save_tensor(tmp_path, "other", torch.zeros_like(built))
        (tmp_path / "other.safetensors").replace(path)
    assert torch.equal(_basis(_fresh(tmp_path)), built)
    assert load_tensor(tmp_path, path.stem) is not None  # rewritten


def test_changed_weights_below_the_layer_are_another_key(tmp_path):
    lm = _fresh(tmp_path)
    first = _basis(lm)
    other = _fresh(tmp_path)
    with torch.no_grad():
        other.adapter.mlp_out(0).weight.mul_(3.0)
    assert not torch.equal(_basis(other), first)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2


def test_the_key_covers_exact_bytes_and_skips_what_it_is_told_to():
    lm = tiny_model("llama")
    edited = lm.adapter.mlp_out(LAYER)
    key = content_key(lm.model, [edited], layer=LAYER)
    with torch.no_grad():
        edited.weight.add_(1.0)  # excluded: the same key
    assert content_key(lm.model, [edited], layer=LAYER) == key
    below = lm.adapter.mlp_out(0).weight
    with torch.no_grad():  # a change far below bfloat16's precision still counts
        below[0, 0] = torch.nextafter(below[0, 0], torch.tensor(1.0))
    assert content_key(lm.model, [edited], layer=LAYER) != key
    assert content_key(lm.model, [edited], layer=LAYER + 1) != content_key(
        lm.model, [edited], layer=LAYER
    )


def test_an_unwritable_cache_only_costs_the_rebuild(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    lm = _fresh(blocked)
    assert _basis(lm).shape[0] == lm.adapter.mlp_out(LAYER).weight.shape[1]
