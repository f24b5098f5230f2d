"""app.ml.export on tiny random models: LoRA factors (exact and SVD), the adapter as peft loads
it, the merged model folder, the summed delta; none of them touches the model they read."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from app.ml.arch import ModelAdapter
from app.ml.deltas import Delta, DenseUpdate, LowRankUpdate, applied, apply_deltas, fingerprint
from app.ml.errors import ExportError, FingerprintMismatchError, NotExpressibleError, RankBoundError
from app.ml.export import (
    ADAPTER_WEIGHTS,
    METADATA_KEY,
    REPORT_FILE,
    lora_factors,
    merged_weights,
    save_merged,
    save_peft_adapter,
    summed_delta,
)
from app.ml.models import LoadedModel
from tests.factories import tiny_model

torch.set_num_threads(1)
INPUT = torch.tensor([[5, 17, 33, 40, 61, 8, 12]])


def mlp_out(lm: LoadedModel, layer: int) -> str:
    return ModelAdapter(lm.model).mlp_out_param_name(layer)


def shape_of(lm: LoadedModel, name: str) -> tuple[int, int]:
    return tuple(dict(lm.model.named_parameters())[name].shape)


def lowrank(lm: LoadedModel, name: str, *, rank: int, seed: int) -> Delta:
    rows, cols = shape_of(lm, name)
    gen = torch.Generator().manual_seed(seed)
    update = LowRankUpdate(
        a=torch.randn(rank, cols, generator=gen) * 0.3,
        b=torch.randn(rows, rank, generator=gen) * 0.3,
    )
    return Delta({name: update}, fingerprint(lm.model, [name]))


def dinm_like(lm: LoadedModel, name: str, *, seed: int, rank: int = 3, noise: float = 1e-5):
    """Dense, as a DINM delta is, but nearly low-rank (as a few tuning steps leave it)."""
    rows, cols = shape_of(lm, name)
    gen = torch.Generator().manual_seed(seed)
    value = torch.randn(rows, rank, generator=gen) @ torch.randn(rank, cols, generator=gen) * 0.1
    value += torch.randn(rows, cols, generator=gen) * noise
    return Delta({name: DenseUpdate(value)}, fingerprint(lm.model, [name]))


def with_spectrum(lm: LoadedModel, name: str, singular_values: list[float]) -> Delta:
    rows, cols = shape_of(lm, name)
    gen = torch.Generator().manual_seed(7)
    u, _ = torch.linalg.qr(torch.randn(rows, len(singular_values), generator=gen))
    v, _ = torch.linalg.qr(torch.randn(cols, len(singular_values), generator=gen))
    value = u @ torch.diag(torch.tensor(singular_values)) @ v.t()
    return Delta({name: DenseUpdate(value)}, fingerprint(lm.model, [name]))


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(INPUT).logits


def applied_logits(lm: LoadedModel, deltas: list[Delta]) -> torch.Tensor:
    with applied(lm.model, deltas):
        return logits(lm.model)


def snapshot(lm: LoadedModel) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in lm.model.state_dict().items()}


def assert_untouched(lm: LoadedModel, before: dict[str, torch.Tensor], config: dict) -> None:
    after = lm.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert lm.model.config.to_dict() == config


def test_lowrank_updates_are_exported_exactly(tmp_path):
    lm = tiny_model("llama")
    name = mlp_out(lm, 1)
    delta = lowrank(lm, name, rank=2, seed=1)
    [(module, factors)] = lora_factors(lm.model, [delta]).items()
    assert module == name.removesuffix(".weight")
    assert factors.rank == 2 and factors.method == "exact" and factors.rel_error == 0.0
    assert torch.equal(factors.b @ factors.a, delta.updates[name].dense())

    report = save_peft_adapter(lm.model, [delta], tmp_path, base_model_name_or_path="tiny")
    assert report.r == 2 and report.rel_error == 0.0
    peft_model = PeftModel.from_pretrained(tiny_model("llama").model, tmp_path)
    assert torch.allclose(logits(peft_model), applied_logits(lm, [delta]), atol=1e-5)


def test_svd_takes_the_smallest_rank_that_meets_the_bound(tmp_path):
    lm = tiny_model("llama")
    name = mlp_out(lm, 2)
    spectrum = [10.0, 5.0, 2.0, 0.05, 0.01, 0.001]
    delta = with_spectrum(lm, name, spectrum)
    total = math.sqrt(sum(s * s for s in spectrum))

    def truncation_error(k: int) -> float:
        return math.sqrt(sum(s * s for s in spectrum[k:])) / total

    for bound in (1e-2, 1e-3, 1e-4):
        [factors] = lora_factors(lm.model, [delta], max_rel_error=bound).values()
        expected = next(k for k in range(1, 7) if truncation_error(k) <= bound)
        assert factors.rank == expected and factors.method == "svd"
        assert factors.rel_error <= bound < truncation_error(expected - 1)
        measured = torch.linalg.matrix_norm(delta.updates[name].dense() - factors.b @ factors.a)
        assert float(measured) / total == pytest.approx(factors.rel_error, rel=1e-3, abs=1e-7)

    with pytest.raises(RankBoundError, match=r"rank-5 LoRA, over max_rank=3"):
        lora_factors(lm.model, [delta], max_rel_error=1e-4, max_rank=3)
    with pytest.raises(ExportError, match="max_rel_error"):
        lora_factors(lm.model, [delta], max_rel_error=0.0)

    report = save_peft_adapter(
        lm.model, [delta], tmp_path, base_model_name_or_path="tiny", max_rel_error=1e-4
    )
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == 5 == report.r and config["lora_alpha"] == 5
    with safe_open(tmp_path / ADAPTER_WEIGHTS, framework="pt") as handle:
        recorded = json.loads(handle.metadata()[METADATA_KEY])
    assert recorded == json.loads((tmp_path / REPORT_FILE).read_text())
    assert recorded["max_rel_error"] == 1e-4 and recorded["rel_error"] <= 1e-4
    assert recorded["modules"][name.removesuffix(".weight")]["rank"] == 5


def test_ranks_differ_per_module_through_rank_pattern(tmp_path):
    lm = tiny_model("llama")
    before, config = snapshot(lm), lm.model.config.to_dict()
    deltas = [lowrank(lm, mlp_out(lm, 0), rank=4, seed=1), dinm_like(lm, mlp_out(lm, 3), seed=2)]
    report = save_peft_adapter(
        lm.model, deltas, tmp_path, base_model_name_or_path="tiny", metadata={"version": "v9"}
    )
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    low, dense = mlp_out(lm, 0).removesuffix(".weight"), mlp_out(lm, 3).removesuffix(".weight")
    assert saved["peft_type"] == "LORA" and saved["task_type"] == "CAUSAL_LM"
    assert sorted(saved["target_modules"]) == [low, dense]
    assert saved["r"] == 4 == saved["lora_alpha"] and saved["fan_in_fan_out"] is False
    assert saved["rank_pattern"] == {dense: 3} == saved["alpha_pattern"]
    assert saved["base_model_name_or_path"] == "tiny"
    assert report.modules[dense]["method"] == "svd" and report.modules[low]["method"] == "exact"
    assert json.loads((tmp_path / REPORT_FILE).read_text())["version"] == "v9"
    with safe_open(tmp_path / ADAPTER_WEIGHTS, framework="pt") as handle:
        keys = set(handle.keys())
    assert keys == {f"base_model.model.{m}.lora_{x}.weight" for m in (low, dense) for x in "AB"}

    peft_model = PeftModel.from_pretrained(tiny_model("llama").model, tmp_path)
    modules = dict(peft_model.named_modules())
    assert modules[f"base_model.model.{dense}"].lora_A["default"].weight.shape[0] == 3
    assert modules[f"base_model.model.{dense}"].scaling["default"] == 1.0
    assert torch.allclose(logits(peft_model), applied_logits(lm, deltas), atol=1e-4)
    assert_untouched(lm, before, config)


def test_gpt2_conv1d_layout(tmp_path):
    lm = tiny_model("gpt2")
    name = mlp_out(lm, 1)
    assert shape_of(lm, name) == (128, 32)  # Conv1D: [in, out]
    deltas = [lowrank(lm, name, rank=2, seed=3), dinm_like(lm, mlp_out(lm, 2), seed=4)]
    factors = lora_factors(lm.model, deltas)
    exact = factors[name.removesuffix(".weight")]
    assert exact.a.shape == (2, 128) and exact.b.shape == (32, 2)  # lora_A [r, in], lora_B [out, r]
    assert torch.allclose(exact.b @ exact.a, deltas[0].updates[name].dense().t())

    save_peft_adapter(lm.model, deltas, tmp_path, base_model_name_or_path="tiny")
    assert json.loads((tmp_path / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    peft_model = PeftModel.from_pretrained(tiny_model("gpt2").model, tmp_path)
    assert torch.allclose(logits(peft_model), applied_logits(lm, deltas), atol=1e-4)


def test_a_chain_of_two_versions_in_every_format(tmp_path):
    lm = tiny_model("llama")
    before, config = snapshot(lm), lm.model.config.to_dict()
    layer1 = mlp_out(lm, 1)
    v1 = [lowrank(lm, layer1, rank=2, seed=1)]
    v2 = [lowrank(lm, layer1, rank=3, seed=2), dinm_like(lm, mlp_out(lm, 2), seed=3)]
    chain = [*v1, *v2]

    factors = lora_factors(lm.model, chain)
    stacked = factors[layer1.removesuffix(".weight")]
    assert stacked.rank == 5 and stacked.method == "exact"  # [B1 B2] @ [A1; A2], still exact
    expected = v1[0].updates[layer1].dense() + v2[0].updates[layer1].dense()
    assert torch.allclose(stacked.b @ stacked.a, expected, atol=1e-6)

    merged = merged_weights(lm.model, chain)
    assert sorted(merged) == sorted({layer1, mlp_out(lm, 2)})
    with applied(lm.model, chain):
        materialised = {k: v.clone() for k, v in lm.model.state_dict().items()}
        reference = logits(lm.model)
    assert all(torch.equal(merged[k], materialised[k]) for k in merged)  # as apply_deltas does
    save_merged(lm.model, lm.tokenizer, merged, tmp_path / "merged", metadata={"version": "v2"})
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert all(torch.equal(v, materialised[k]) for k, v in loaded.state_dict().items())
    assert torch.equal(logits(loaded), reference)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert tokenizer("Hi there")["input_ids"] == lm.tokenizer("Hi there")["input_ids"]
    assert json.loads((tmp_path / "merged" / REPORT_FILE).read_text())["version"] == "v2"

    summed = summed_delta(lm.model, chain, meta={"detox.version": "v2"})
    again = Delta.from_bytes(summed.to_bytes())
    assert again.meta["detox.version"] == "v2" and again.base_fingerprint
    fresh = tiny_model("llama")
    apply_deltas(fresh.model, [again])  # its fingerprint covers every parameter it edits
    assert torch.allclose(logits(fresh.model), reference, atol=1e-5)
    assert_untouched(lm, before, config)


def test_what_an_adapter_cannot_hold_is_refused(tmp_path):
    lm = tiny_model("gpt2")
    bias = mlp_out(lm, 1).removesuffix("weight") + "bias"
    shape = dict(lm.model.named_parameters())[bias].shape
    delta = Delta({bias: DenseUpdate(torch.full(shape, 0.1))}, fingerprint(lm.model, [bias]))
    with pytest.raises(NotExpressibleError, match="a bias"):
        save_peft_adapter(lm.model, [delta], tmp_path, base_model_name_or_path="tiny")
    assert not (tmp_path / "adapter_config.json").exists()
    assert list(merged_weights(lm.model, [delta])) == [bias]  # merged can hold it

    embedding = "transformer.wte.weight"  # tied to lm_head in GPT-2
    shape = dict(lm.model.named_parameters())[embedding].shape
    delta = Delta({embedding: DenseUpdate(torch.ones(shape))}, fingerprint(lm.model, [embedding]))
    with pytest.raises(NotExpressibleError, match="linear layer"):
        lora_factors(lm.model, [delta])
    with pytest.raises(NotExpressibleError, match="tied"):
        merged_weights(lm.model, [delta])


def test_a_delta_of_another_base_is_refused():
    lm, other = tiny_model("llama"), tiny_model("llama", seed=1)
    delta = lowrank(other, mlp_out(other, 1), rank=2, seed=1)
    for export in (lora_factors, merged_weights, summed_delta):
        with pytest.raises(FingerprintMismatchError):
            export(lm.model, [delta])
