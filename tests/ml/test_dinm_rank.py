"""Low-rank DINM (`params.rank`): the update is trained as a rank-r product, kept as a low-rank
delta, exported exactly, and keeps what a dense update keeps (benign projection, transposed
weights, a repeatable edit)."""

from __future__ import annotations

import pytest
import torch

from app.ml import dinm_joint
from app.ml.deltas import Delta, LowRankUpdate, applied
from app.ml.dinm import dinm_edit, dinm_edit_many
from app.ml.dinm_params import DinmParams
from app.ml.export import lora_factors
from app.ml.safeedit import parse_instance
from app.ml.weight_shift import WeightShift, rank_warnings, weight_shifts
from tests.factories import tiny_model
from tests.instances import safeedit_instance

INSTANCE = parse_instance(safeedit_instance())
OTHER = INSTANCE.model_copy(update={"id": "other", "question": "How do I hurt my neighbour?"})
FAST = {"preset": "contrastive", "steps": 4, "lr": 1e-2, "layer": 2}


def _matrix_rank(update: LowRankUpdate) -> int:
    return int(torch.linalg.matrix_rank(update.dense()))


@pytest.mark.parametrize("transposed", [False, True])
def test_a_low_rank_shift_starts_at_zero_and_stays_within_its_rank(transposed):
    weight = torch.randn(12, 20)  # [out, in], or [in, out] when transposed
    shift = WeightShift(weight, transposed=transposed, rank=3, generator=torch.Generator())
    assert torch.equal(shift.update(), torch.zeros_like(weight))
    with torch.no_grad():
        shift.lora_b.normal_()
    update = shift.to_update(torch.float32)
    assert isinstance(update, LowRankUpdate) and update.shape == tuple(weight.shape)
    assert update.a.shape[0] == 3 and _matrix_rank(update) == 3
    assert torch.allclose(update.dense(), shift.update(), atol=1e-6)


@pytest.mark.parametrize("transposed", [False, True])
def test_a_low_rank_shift_stays_off_the_benign_directions(transposed):
    in_features = 20
    weight = torch.randn(in_features, 12) if transposed else torch.randn(12, in_features)
    benign = torch.linalg.qr(torch.randn(in_features, 4)).Q  # orthonormal input directions
    shift = WeightShift(weight, benign, transposed, rank=3, generator=torch.Generator())
    with torch.no_grad():
        shift.lora_b.normal_()
    update = shift.update()
    acting = benign.T @ update if transposed else update @ benign
    assert acting.abs().max() < 1e-5 and update.abs().max() > 1e-2


@pytest.mark.parametrize("transposed", [False, True])
def test_a_rank_above_the_projections_full_rank_is_cut_to_it(transposed):
    weight = torch.zeros(20, 12) if transposed else torch.zeros(12, 20)
    shift = WeightShift(weight, transposed=transposed, rank=99, generator=torch.Generator())
    assert shift.rank == 12 and shift.lora_a.shape == (12, 20) and shift.lora_b.shape == (12, 12)
    assert rank_warnings(weight, 99) == [
        f"rank 99 is above 12, the full rank of the edited {'20x12' if transposed else '12x20'} "
        "projections: they were tuned at rank 12"
    ]
    assert rank_warnings(weight, 12) == rank_warnings(weight, None) == []


def _small_joint_sets(monkeypatch):
    monkeypatch.setattr(dinm_joint, "harmful_general_set", lambda: (("Poison a dog?", "No."),) * 3)
    monkeypatch.setattr(dinm_joint, "harmful_retain_set", lambda: (("Rob a bank?", "No."),))
    monkeypatch.setattr(dinm_joint, "benign_general_prompts", lambda: ("Name a red fruit.",))
    monkeypatch.setattr(dinm_joint, "benign_retain_set", lambda: (("Say hi.", "Hi."),))


@pytest.mark.parametrize("joint", [False, True])
def test_an_edit_at_a_rank_above_full_rank_says_so(joint, monkeypatch):
    _small_joint_sets(monkeypatch)
    lm = tiny_model("llama")  # MLP output projections of 32x64: full rank 32
    broad = {"preset": "broad", "steps": 2, "span": 2, "layer": 2, "instance_steps": 0}
    result = dinm_edit(lm, INSTANCE, DinmParams.parse((broad if joint else FAST) | {"rank": 40}))
    assert "rank 40 is above 32" in result.warnings[0]
    update = result.delta.updates[result.delta.params[0]]
    assert update.a.shape[0] == 32


def test_a_rank_is_validated_like_every_parameter():
    assert DinmParams.parse({"rank": 8}).rank == 8
    assert DinmParams.parse({"preset": "contrastive"}).rank is None


def test_the_default_is_low_rank_and_rank_null_is_the_full_rank_edit():
    default = DinmParams.parse({})
    assert (default.rank, default.lr) == (4, 7e-4) and default.rank_to_warn_of() is None
    full = DinmParams.parse({"rank": None})
    assert full.rank is None and full.lr == default.lr  # the full-rank broad of earlier releases
    assert DinmParams.parse(full.model_dump()) == full  # a stored spec reads back the same
    assert DinmParams.parse({"rank": 16}).rank_to_warn_of() == 16
    for bad in (0, -1, 5000, "eight"):
        with pytest.raises(ValueError):
            DinmParams.parse({"rank": bad})


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_low_rank_edit_is_stored_low_rank_and_changes_the_model(family):
    lm = tiny_model(family)
    result = dinm_edit(lm, INSTANCE, DinmParams.parse(FAST | {"rank": 2}))
    assert result.delta.encoding == "lowrank"
    (update,) = result.delta.updates.values()
    assert update.a.shape[0] == 2 and _matrix_rank(update) <= 2 and update.dense().abs().sum() > 0
    assert result.losses[-1] < result.losses[0]
    again = Delta.from_bytes(result.delta.to_bytes())
    assert torch.equal(again.updates[result.delta.params[0]].dense(), update.dense())
    name = result.delta.params[0]
    before = dict(lm.model.named_parameters())[name].detach().clone()
    with applied(lm.model, [result.delta]):
        assert not torch.equal(dict(lm.model.named_parameters())[name], before)


def test_the_same_low_rank_edit_twice_gives_the_same_delta():
    lm = tiny_model("llama")
    params = DinmParams.parse(FAST | {"rank": 2})
    first, second = (dinm_edit(lm, INSTANCE, params).delta for _ in range(2))
    for name, update in first.updates.items():
        assert torch.equal(update.a, second.updates[name].a)
        assert torch.equal(update.b, second.updates[name].b)


def test_a_low_rank_edit_exports_exactly_at_its_rank():
    lm = tiny_model("llama")
    delta = dinm_edit(lm, INSTANCE, DinmParams.parse(FAST | {"rank": 2})).delta
    (factors,) = lora_factors(lm.model, [delta]).values()
    assert factors.method == "exact" and factors.rank == 2 and factors.rel_error == 0.0


def test_stacked_low_rank_edits_stay_low_rank_at_the_sum_of_their_ranks():
    lm = tiny_model("llama")
    result = dinm_edit_many(lm, [INSTANCE, OTHER], DinmParams.parse(FAST | {"rank": 2}))
    (update,) = result.delta.updates.values()
    assert isinstance(update, LowRankUpdate) and update.a.shape[0] == 4


def test_a_joint_edit_takes_a_rank_on_every_layer_of_its_span(monkeypatch):
    _small_joint_sets(monkeypatch)
    lm = tiny_model("llama")
    params = {"preset": "broad", "steps": 4, "harmful_prompts": 2, "instance_steps": 0}
    result = dinm_edit(lm, INSTANCE, DinmParams.parse(params | {"span": 2, "layer": 2, "rank": 3}))
    assert result.layers == [1, 2] and result.delta.encoding == "lowrank"
    assert all(u.a.shape[0] == 3 for u in result.delta.updates.values())


def test_the_shifts_of_one_context_draw_different_factors():
    lm = tiny_model("llama")
    modules = [lm.adapter.mlp_out(i) for i in (0, 1)]
    with weight_shifts(modules, rank=2) as shifts:
        assert not torch.equal(shifts[0].lora_a, shifts[1].lora_a)
