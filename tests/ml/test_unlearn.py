"""Corpus unlearning on tiny random models: masks, methods, scopes, guard, determinism."""

from __future__ import annotations

import pytest
import torch

from app.ml.corpus import Document
from app.ml.deltas import Delta, LowRankUpdate, applied
from app.ml.errors import EditCancelled, InputError
from app.ml.unlearn import unlearn
from app.ml.unlearn_data import collate, pieces
from app.ml.unlearn_params import UnlearnParams
from app.ml.unlearn_scope import module_names, trainable
from app.ml.unlearn_trainer import Trainer
from tests.factories import tiny_model

FORGET = [
    Document("the cat is nasty and mean", ((11, 17),)),
    Document("dogs are stupid animals", ((9, 15),)),
]
RETAIN = [Document("the sun rises in the east"), Document("water boils at one hundred")]


def logits(lm, text="the cat sat on the mat"):
    ids = lm.tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return lm.model(input_ids=ids).logits


def weights(lm) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in lm.model.named_parameters()}


def test_masked_ga_puts_no_gradient_outside_the_spans():
    lm = tiny_model("llama")
    params = UnlearnParams(scope="dense")
    encoded = pieces(lm, FORGET, 64, all_tokens=False)
    seen: list[torch.Tensor] = []

    def capture(_module, args):  # the head's full input, before anything selects from it
        args[0].retain_grad()
        seen.append(args[0])

    handle = lm.adapter.head.register_forward_pre_hook(capture)
    try:
        with trainable(lm, module_names(lm, params), params) as update:
            trainer = Trainer(lm, update, encoded, pieces(lm, RETAIN, 64, all_tokens=True),
                              "masked_ga", params)  # fmt: skip
            trainer._loss_terms(encoded)["loss"].backward()
    finally:
        handle.remove()
    # Gradient reaching the head at each position that predicts a next token: [B, T-1].
    grad = seen[0].grad.abs().sum(-1)[:, :-1]
    batch = collate(encoded, 0, lm.device)
    assert batch.targets.any() and not batch.targets.all()
    assert torch.all(grad[~batch.targets] == 0)
    assert torch.all(grad[batch.targets] > 0)


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2", "gpt-neox", "opt"])
def test_target_only_head_gives_the_full_models_nll(family):
    lm = tiny_model(family)
    params = UnlearnParams(scope="dense")
    encoded = pieces(lm, FORGET, 64, all_tokens=False)
    batch = collate(encoded, 0, lm.device)
    with torch.no_grad():
        full = lm.model(input_ids=batch.ids, attention_mask=batch.attention).logits[:, :-1]
        expected = torch.nn.functional.cross_entropy(
            full[batch.targets].float(), batch.ids[:, 1:][batch.targets], reduction="none"
        )
        with trainable(lm, module_names(lm, params), params) as update:
            trainer = Trainer(lm, update, encoded, encoded, "masked_ga", params)
            got = trainer._target_nll(batch)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("scope", ["lora", "dense"])
@pytest.mark.parametrize("method", ["masked_ga", "ga", "graddiff", "npo"])
def test_every_method_and_scope_raises_the_forget_loss_and_restores_the_base(family, scope, method):
    lm = tiny_model(family)
    base = weights(lm)
    grads = [p.requires_grad for p in lm.model.parameters()]
    params = UnlearnParams(steps=6, lr=1e-2, scope=scope, check_every=3, max_ppl_increase=None,
                           kl_weight=0.5 if method == "ga" else 0.0)  # fmt: skip
    result = unlearn(lm, FORGET, RETAIN, method, params)
    assert result.stopped == "steps" and result.steps == 6
    history = result.history
    assert history[-1]["forget_nll"] > history[0]["forget_nll"]
    assert result.forget_nll_after > result.forget_nll_before
    assert ("retain_nll" in history[0]) == (method == "graddiff")
    assert ("retain_kl" in history[0]) == (method == "ga")
    encoding = {"lora": LowRankUpdate}.get(scope)
    for update in result.delta.updates.values():
        assert (encoding is None) or isinstance(update, encoding)
        assert update.dense().abs().sum() > 0
    after = weights(lm)
    assert after.keys() == base.keys()
    assert all(torch.equal(after[n], base[n]) for n in base)  # bitwise: nothing merged
    assert [p.requires_grad for p in lm.model.parameters()] == grads  # as they were
    with applied(lm.model, [result.delta]):
        assert not torch.allclose(logits(lm), logits(tiny_model(family)))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_lora_delta_is_exactly_the_adapter(family):
    """The stored low-rank delta, merged into the base, gives the adapter model's own outputs."""
    lm = tiny_model(family)
    params = UnlearnParams(lora_rank=4, layers=[1])
    names = module_names(lm, params)
    with trainable(lm, names, params) as update:
        with torch.no_grad():
            for p in update.parameters:
                p.normal_(0, 0.2)  # B starts at zero: make the adapter do something
        with_adapter = logits(lm)
        updates = update.updates()
    with applied(lm.model, [Delta(updates)]):
        merged = logits(lm)
    assert not torch.allclose(with_adapter, logits(lm), atol=1e-4)
    torch.testing.assert_close(merged, with_adapter, atol=1e-5, rtol=1e-4)


def test_perplexity_guard_stops_and_keeps_the_last_good_state():
    lm = tiny_model("llama")
    params = UnlearnParams(steps=20, lr=0.5, scope="dense", check_every=2, max_ppl_increase=0.01)
    result = unlearn(lm, FORGET, RETAIN, "ga", params)
    assert result.stopped == "perplexity_guard"
    assert result.checks[-1]["retain_ppl"] > result.retain_ppl_before * 1.01
    assert result.steps < 20 and result.steps == result.checks[-2]["step"]
    if result.steps == 0:  # the first check already failed: the edit is empty
        assert all(u.dense().abs().sum() == 0 for u in result.delta.updates.values())


def test_forget_target_stops_early():
    lm = tiny_model("llama")
    params = UnlearnParams(steps=50, lr=5e-2, scope="dense", max_ppl_increase=None,
                           stop_forget_nll=4.7)  # fmt: skip
    result = unlearn(lm, FORGET, RETAIN, "masked_ga", params)
    assert result.stopped == "forget_target" and result.steps < 50
    assert result.history[-1]["forget_nll"] >= 4.7


def test_same_seed_same_delta_other_seed_other_delta():
    def run(seed):
        params = UnlearnParams(steps=3, lr=1e-2, seed=seed, batch_size=1)
        return unlearn(tiny_model("llama"), FORGET, RETAIN, "masked_ga", params).delta

    one, two, other = run(1), run(1), run(2)
    for name in one.updates:
        assert torch.equal(one.updates[name].dense(), two.updates[name].dense())
    assert any(
        not torch.equal(one.updates[n].dense(), other.updates[n].dense()) for n in one.updates
    )


def test_modules_layers_and_input_errors():
    lm = tiny_model("llama")
    names = module_names(lm, UnlearnParams(modules=["mlp_out", "q_proj"], layers=[1]))
    assert names == ["model.layers.1.mlp.down_proj", "model.layers.1.self_attn.q_proj"]
    with pytest.raises(InputError, match="no linear module named 'nope'"):
        module_names(lm, UnlearnParams(modules=["nope"]))
    with pytest.raises(InputError, match="out of range"):
        module_names(lm, UnlearnParams(layers=[99]))
    unmarked = [Document("a perfectly fine sentence", ())]
    with pytest.raises(InputError, match="no harmful token"):
        unlearn(lm, unmarked, RETAIN, "masked_ga", UnlearnParams(steps=1))
    with pytest.raises(InputError, match="retain"):
        unlearn(lm, FORGET, [], "masked_ga", UnlearnParams(steps=1))


def test_progress_and_cancel():
    lm = tiny_model("llama")
    seen: list[tuple[str, float]] = []
    unlearn(lm, FORGET, RETAIN, "masked_ga", UnlearnParams(steps=2),
            progress=lambda stage, f: seen.append((stage, f)))  # fmt: skip
    assert ("unlearn", 1.0) in seen
    base = weights(lm)
    calls = iter([False, True])
    with pytest.raises(EditCancelled, match="after 1 of 5"):
        unlearn(lm, FORGET, RETAIN, "masked_ga", UnlearnParams(steps=5),
                should_cancel=lambda: next(calls))  # fmt: skip
    assert all(torch.equal(p, base[n]) for n, p in lm.model.named_parameters())
