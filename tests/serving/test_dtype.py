"""Serving in bfloat16: which dtype "auto" picks, and a version's deltas applied in bfloat16
beside the base weights drift from the float32 version about as much as the version's own merged
weights rounded to bfloat16 do."""

from __future__ import annotations

import asyncio
import copy

import pytest
import torch

from app.ml.deltas import applied
from app.ml.models import LoadedModel
from app.serving.dtype import cpu_bf16_flag, describe, serving_dtype
from app.serving.engine import Engine
from app.serving.factory import StoreVersionSource
from app.serving.sampling import SamplingParams
from app.serving.weights import BatchDeltaHooks, version_weights
from tests.factories import tiny_model
from tests.serving.conftest import random_delta, store_version


def test_auto_takes_bfloat16_on_cuda_and_on_cpus_with_native_bfloat16(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16 avx512_vnni\n")
    assert cpu_bf16_flag(cpuinfo) == "avx512_bf16"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2\n")
    assert cpu_bf16_flag(cpuinfo) is None
    assert cpu_bf16_flag(tmp_path / "missing") is None
    assert serving_dtype("auto", "cuda") == ("bfloat16", "auto: CUDA")
    assert serving_dtype("float32", "cuda") == ("float32", "DETOX_SERVING_DTYPE")
    on_cpu = serving_dtype("auto", "cpu")
    assert on_cpu[0] == ("bfloat16" if cpu_bf16_flag() else "float32")
    assert describe("auto", "auto").startswith("bfloat16 weights on CUDA, else ")
    assert describe("bfloat16", "cpu") == "bfloat16 weights (DETOX_SERVING_DTYPE)"


def in_bfloat16(lm: LoadedModel) -> LoadedModel:
    return LoadedModel(copy.deepcopy(lm.model).to(torch.bfloat16), lm.tokenizer, lm.name)


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
@pytest.mark.parametrize("lowrank", [False, True])
def test_deltas_in_bfloat16_drift_as_the_version_in_bfloat16_does(family, lowrank):
    lm = tiny_model(family)
    half = in_bfloat16(lm)
    delta = random_delta(lm, layer=1, seed=3, lowrank=lowrank)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])
    with torch.inference_mode():
        base32 = lm.model(input_ids=ids).logits
        with applied(lm.model, [delta]):
            version32 = lm.model(input_ids=ids).logits
            merged16 = in_bfloat16(lm).model(input_ids=ids).logits.float()
        hooks = BatchDeltaHooks(half.model)
        with hooks.using(hooks.plan([version_weights(half.model, "v", [delta])] * 2)):
            version16 = half.model(input_ids=ids).logits.float()
        hooks.remove()
    model_drift = (merged16 - version32).abs().max()  # the version as a bfloat16 model
    version_drift = (version16 - version32).abs().max()  # as served: base + delta, in bfloat16
    assert model_drift > 0  # bfloat16 does round: the comparison means something
    assert version_drift <= 2 * model_drift  # measured: 0.84x to 1.40x
    assert (version32 - base32).abs().max() > 10 * version_drift  # the delta itself is served


def test_a_bfloat16_engine_serves_versions(sessions):
    lm = in_bfloat16(tiny_model("llama"))
    store_version(sessions, lm, random_delta(lm, layer=1, seed=1), name="v1")
    engine = Engine(lm, StoreVersionSource(sessions, base_fingerprint=lm.base_fingerprint))
    try:
        ids, params = [5, 6, 7], SamplingParams(max_tokens=12, temperature=0.0)
        base, v1 = asyncio.run(engine.complete_together(
            [(ids, engine.target("base"), params), (ids, engine.target("v1"), params)]
        ))  # fmt: skip
        assert "bfloat16 weights" in engine.health().detail
    finally:
        engine.close()
    assert base.completion_tokens == v1.completion_tokens == 12 or "stop" in (
        base.finish_reason, v1.finish_reason)  # fmt: skip
    assert base.token_ids != v1.token_ids
