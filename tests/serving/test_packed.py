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
    assert "packed" not in details[0] and details[1].endswith("linear layers packed for oneDNN")
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
