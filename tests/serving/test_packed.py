"""bfloat16 linear layers computed from weights packed for oneDNN give what F.linear gives."""

from __future__ import annotations

import asyncio

import pytest
import torch
from torch import nn

from app.serving.engine import Engine
from app.serving.factory import StoreVersionSource
from app.serving.packed import PackedForward, pack_linears, packing_works, unpack_linears
from app.serving.sampling import SamplingParams
from tests.factories import tiny_model
from tests.serving.conftest import random_delta, store_version
from tests.serving.test_dtype import in_bfloat16

pytestmark = pytest.mark.skipif(not packing_works(), reason="this torch build cannot pack")
IDS = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])


def _linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


@pytest.mark.parametrize("family", ["llama", "opt"])  # opt's layers have biases
def test_packed_layers_give_the_logits_of_the_plain_ones(family):
    lm = in_bfloat16(tiny_model(family))
    with torch.inference_mode():
        plain = lm.model(input_ids=IDS).logits
    assert pack_linears(lm.model) == len(_linears(lm.model)) > 0
    assert pack_linears(lm.model) == 0  # already packed
    with torch.inference_mode():
        packed = lm.model(input_ids=IDS).logits
    torch.testing.assert_close(packed, plain, rtol=0, atol=1e-2)
    unpack_linears(lm.model)
    assert not any(isinstance(m.forward, PackedForward) for m in _linears(lm.model))


def test_only_bfloat16_layers_are_packed():
    assert pack_linears(tiny_model("llama").model) == 0


def test_a_weight_changed_in_place_is_packed_again_and_gradients_run_unpacked():
    layer = nn.Linear(40, 24).to(torch.bfloat16)
    x = torch.randn(3, 40).to(torch.bfloat16)
    holder = nn.Sequential(layer)
    assert pack_linears(holder) == 1
    with torch.inference_mode():
        before = layer(x)
        with torch.no_grad():
            layer.weight.mul_(2.0)
        after = layer(x)
    torch.testing.assert_close(after, nn.functional.linear(x, layer.weight, layer.bias))
    assert not torch.allclose(before, after)
    assert layer(x).requires_grad  # with gradients on, F.linear as before


def test_a_packed_engine_serves_the_tokens_of_an_unpacked_one(sessions):
    lm = in_bfloat16(tiny_model("llama"))
    store_version(sessions, lm, random_delta(lm, layer=1, seed=1), name="v1")
    ids, params = [5, 6, 7], SamplingParams(max_tokens=16, temperature=0.0)
    answers, details = [], []
    for packed in (False, True):
        source = StoreVersionSource(sessions, base_fingerprint=lm.base_fingerprint)
        engine = Engine(lm, source, packed=packed)
        try:
            answers.append(asyncio.run(engine.complete_together(
                [(ids, engine.target("base"), params), (ids, engine.target("v1"), params)]
            )))  # fmt: skip
            details.append(engine.health().detail)
        finally:
            engine.close()
    plain, packed = ([a.token_ids for a in pair] for pair in answers)
    assert packed == plain and plain[0] != plain[1]
    assert "packed" not in details[0] and "linear layers packed for oneDNN" in details[1]
    assert not any(isinstance(m.forward, PackedForward) for m in _linears(lm.model))  # closed


def test_the_weights_are_packed_on_the_compute_thread(sessions, monkeypatch):
    """The only thread that runs torch: another would bring a second OpenMP team (batcher)."""
    import threading

    import app.serving.engine as engine_module

    threads = []

    def recording(model):
        threads.append(threading.current_thread().name)
        return pack_linears(model)

    monkeypatch.setattr(engine_module, "pack_linears", recording)
    lm = in_bfloat16(tiny_model("llama"))
    engine = Engine(lm, StoreVersionSource(sessions, base_fingerprint=lm.base_fingerprint))
    try:
        assert threads == ["detox-compute"] and "packed" in engine.health().detail
    finally:
        engine.close()


def test_q_k_v_and_gate_up_are_packed_as_one_matrix_each():
    lm = in_bfloat16(tiny_model("llama"))
    pack_linears(lm.model)
    layer = lm.model.model.layers[0]
    attention, mlp = layer.self_attn, layer.mlp
    assert isinstance(attention.o_proj.forward, PackedForward)
    assert isinstance(mlp.down_proj.forward, PackedForward)
    qkv = {m.forward.group for m in (attention.q_proj, attention.k_proj, attention.v_proj)}
    gate_up = {m.forward.group for m in (mlp.gate_proj, mlp.up_proj)}
    assert len(qkv) == len(gate_up) == 1 and qkv != gate_up


def test_group_members_give_their_own_outputs_whatever_their_inputs():
    lm = in_bfloat16(tiny_model("llama"))
    attention = lm.model.model.layers[0].self_attn
    pack_linears(lm.model)
    generator = torch.Generator().manual_seed(0)
    x, y = (torch.randn(2, 3, 32, generator=generator).to(torch.bfloat16) for _ in range(2))

    def check(module: nn.Linear, inputs: torch.Tensor) -> None:
        expected = nn.functional.linear(inputs, module.weight, module.bias)
        torch.testing.assert_close(module(inputs), expected, rtol=1e-2, atol=1e-2)

    with torch.no_grad():
        check(attention.q_proj, x)
        check(attention.k_proj, y)  # another input: computed for it
        check(attention.v_proj, x)  # the first input again: computed again
        check(attention.q_proj, y)
        check(attention.q_proj, y)  # its slice already taken: computed again
        check(attention.k_proj, x)
        x.mul_(-1.0)  # changed in place: the group must not hand out the old product
        check(attention.v_proj, x)
        attention.v_proj.weight.mul_(2.0)  # a member's weight changed: packed again
        check(attention.q_proj, y)
        check(attention.v_proj, y)


def test_a_groups_activations_are_dropped_once_every_member_took_its_slice():
    lm = in_bfloat16(tiny_model("llama"))
    mlp = lm.model.model.layers[0].mlp
    pack_linears(lm.model)
    x = torch.randn(1, 4, 32).to(torch.bfloat16)
    group = mlp.gate_proj.forward.group
    with torch.inference_mode():
        mlp.gate_proj(x)
        assert group._input is x
        mlp.up_proj(x)
    assert group._input is None


def test_a_group_members_forward_hook_runs_on_its_own_slice():
    lm = in_bfloat16(tiny_model("llama"))
    attention = lm.model.model.layers[0].self_attn
    pack_linears(lm.model)
    attention.k_proj.register_forward_hook(lambda _m, _a, out: out + 100.0)
    x = torch.randn(1, 2, 32).to(torch.bfloat16)
    with torch.inference_mode():
        q, k = attention.q_proj(x), attention.k_proj(x)
    torch.testing.assert_close(q, nn.functional.linear(x, attention.q_proj.weight), atol=1e-2,
                               rtol=1e-2)  # fmt: skip
    k_plain = nn.functional.linear(x, attention.k_proj.weight) + 100.0
    torch.testing.assert_close(k, k_plain, atol=1e-1, rtol=1e-2)
