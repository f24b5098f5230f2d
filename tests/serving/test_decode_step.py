"""The lean decoding step gives the logits of the model's own forward, or is not used."""

from __future__ import annotations

import asyncio
import logging

import pytest
import torch
from transformers import DynamicCache

from app.ml.deltas import Delta, DenseUpdate, fingerprint
from app.ml.models import LoadedModel
from app.serving.decode_step import LlamaLikeStep, decode_step
from app.serving.engine import Engine
from app.serving.factory import StoreVersionSource
from app.serving.packed import pack_linears, packing_works
from app.serving.sampling import SamplingParams
from app.serving.weights import BatchDeltaHooks, version_weights
from tests.factories import tiny_model
from tests.serving.conftest import store_version
from tests.serving.test_dtype import in_bfloat16

PROMPTS = torch.tensor([[0, 0, 0, 5, 6, 7], [0, 8, 9, 10, 11, 12], [13, 14, 15, 16, 17, 18]])


def _steps_both_ways(lm: LoadedModel, step: LlamaLikeStep, steps: int = 5, prompts=PROMPTS):
    """Logits of `steps` greedy decoding steps after a prefill of `prompts` (0: left padding):
    (model's, step's)."""
    model = lm.model
    out = []
    for lean in (False, True):
        cache, mask = DynamicCache(), (prompts != 0).long()
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            logits = model(input_ids=prompts, attention_mask=mask, position_ids=positions,
                           past_key_values=cache, use_cache=True).logits  # fmt: skip
            seen = []
            for _ in range(steps):
                ids = logits[:, -1:].argmax(-1)
                mask = torch.cat([mask, mask.new_ones((len(mask), 1))], dim=1)
                positions = positions[:, -1:] + 1
                if lean:
                    logits = step(ids, mask, positions, cache)
                else:
                    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                   past_key_values=cache, use_cache=True).logits  # fmt: skip
                seen.append(logits)
        out.append(torch.cat(seen, dim=1))
    return out


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])  # qwen2: q/k/v biases
@pytest.mark.parametrize("bfloat16", [False, True])
def test_lean_steps_give_the_logits_of_the_models_forward(family, bfloat16):
    lm = tiny_model(family)
    lm = in_bfloat16(lm) if bfloat16 else lm
    if bfloat16 and packing_works():
        assert pack_linears(lm.model) > 0  # as the engine serves it: packed, q/k/v grouped
    step = decode_step(lm.model)
    assert isinstance(step, LlamaLikeStep)
    expected, got = _steps_both_ways(lm, step)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("bfloat16", [False, True])
def test_without_padding_lean_steps_give_the_logits_within_rounding(bfloat16):
    """Without padding, transformers attends with SDPA's enable_gqa; the lean step keeps its
    padded-batch layout, which rounds differently in bfloat16 only."""
    lm = tiny_model("llama")
    lm = in_bfloat16(lm) if bfloat16 else lm
    step = decode_step(lm.model)
    expected, got = _steps_both_ways(lm, step, steps=8, prompts=PROMPTS[2:])
    tolerance = 5e-2 if bfloat16 else 1e-5
    torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_lean_steps_run_each_rows_version_deltas():
    lm = tiny_model("llama")
    names = ["model.layers.1.self_attn.k_proj.weight", "model.layers.2.mlp.up_proj.weight"]
    params = dict(lm.model.named_parameters())
    gen = torch.Generator().manual_seed(3)
    updates = {n: DenseUpdate(torch.randn(*params[n].shape, generator=gen)) for n in names}
    weights = version_weights(lm.model, "v", [Delta(updates, fingerprint(lm.model, names))])
    hooks = BatchDeltaHooks(lm.model)
    step = decode_step(lm.model)
    try:
        with hooks.using(hooks.plan([None, weights, weights])):
            expected, got = _steps_both_ways(lm, step)
        with hooks.using(hooks.plan([None, None, None])):
            base, _ = _steps_both_ways(lm, step)
    finally:
        hooks.remove()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[0], base[0], rtol=1e-5, atol=1e-5)  # row 0 runs the base
    assert not torch.allclose(got[1:], base[1:], atol=1e-3)


def test_hooks_on_a_layers_parts_run_in_lean_steps():
    """The lean step skips nn.Module's call machinery only where no hook would run: hooks on a
    norm, a projection, the activation or the q/k/v of a packed group still change its logits
    as they change the forward's."""
    lm = in_bfloat16(tiny_model("llama"))
    pack_linears(lm.model)
    layer = lm.model.model.layers[1]
    parts = [layer.post_attention_layernorm, layer.self_attn.o_proj, layer.mlp.act_fn,
             layer.self_attn.k_proj, lm.model.model.norm]  # fmt: skip
    plain = decode_step(lm.model)
    base, _ = _steps_both_ways(lm, plain)
    for part in parts:
        part.register_forward_hook(lambda _m, _a, out: out * 1.5)
    step = decode_step(lm.model)
    assert isinstance(step, LlamaLikeStep)
    expected, got = _steps_both_ways(lm, step)
    assert torch.equal(got, expected)
    assert not torch.allclose(got, base, atol=1e-2)


def test_a_global_module_hook_runs_in_lean_steps():
    lm = tiny_model("llama")
    target = lm.model.model.layers[0].mlp.down_proj
    step = decode_step(lm.model)
    base, _ = _steps_both_ways(lm, step)
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda m, _a, out: out * 1.5 if m is target else None
    )
    try:
        expected, got = _steps_both_ways(lm, step)
    finally:
        handle.remove()
    assert torch.equal(got, expected)
    assert not torch.allclose(got, base, atol=1e-3)


@pytest.mark.parametrize("family", ["gpt2", "opt", "gemma2", "phi3"])
def test_other_shapes_decode_through_the_models_forward(family, caplog):
    with caplog.at_level(logging.INFO, logger="app.serving.decode_step"):
        assert decode_step(tiny_model(family).model) is None
    assert "decoding steps call the model's own forward" in caplog.text


def test_eager_attention_decodes_through_the_models_forward():
    lm = tiny_model("llama")
    lm.model.set_attn_implementation("eager")
    assert decode_step(lm.model) is None


def test_a_model_whose_step_differs_from_the_probe_is_not_given_one(caplog):
    """A hook on a decoder layer runs in the model's forward only: the probe must see that."""
    lm = tiny_model("llama")
    lm.model.model.layers[1].register_forward_hook(lambda _m, _a, out: out * 1.5)
    with caplog.at_level(logging.INFO, logger="app.serving.decode_step"):
        assert decode_step(lm.model) is None
    assert "a probe step's logits differ from the model's" in caplog.text


def test_an_engine_with_lean_steps_serves_the_tokens_of_one_without(sessions):
    lm = tiny_model("llama")
    name = "model.layers.1.self_attn.v_proj.weight"
    weight = dict(lm.model.named_parameters())[name]
    gen = torch.Generator().manual_seed(5)
    delta = Delta({name: DenseUpdate(torch.randn(*weight.shape, generator=gen))},
                  fingerprint(lm.model, [name]))  # fmt: skip
    store_version(sessions, lm, delta, name="v1")
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [15]]
    jobs = [(p, m, SamplingParams(max_tokens=12, temperature=0.0, stop=stop))
            for p in prompts for m in ("base", "v1") for stop in ((), ("e",))]  # fmt: skip
    answers, details = [], []
    for lean in (False, True):
        source = StoreVersionSource(sessions, base_fingerprint=lm.base_fingerprint)
        engine = Engine(lm, source, lean_step=lean)
        try:
            targeted = [(p, engine.target(m), params) for p, m, params in jobs]
            answers.append(asyncio.run(engine.complete_together(targeted)))
            details.append(engine.health().detail)
        finally:
            engine.close()
    plain, lean = ([(a.token_ids, a.text, a.finish_reason) for a in run] for run in answers)
    assert lean == plain
    assert plain[0] != plain[2]  # the version changes the tokens
    assert "lean" not in details[0] and details[1].endswith(", lean decoding steps")
