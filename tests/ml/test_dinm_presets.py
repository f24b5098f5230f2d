import json
from pathlib import Path

import pytest
import torch

import app.ml.dinm as dinm_module
from app.ml.dinm import DinmParams, dinm_edit
from app.ml.dinm_objective import (
    DinmObjective,
    answer_groups,
    benign_retain_set,
    harmful_retain_set,
)
from app.ml.dinm_params import DEFAULT_PRESET, PRESETS
from app.ml.errors import InputError
from app.ml.prompts import chat_text, encode_prompt_answer
from app.ml.runners import FastRunner, PlainRunner
from app.ml.weight_shift import WeightShift
from tests.factories import tiny_model
from tests.ml.test_dinm import INSTANCE

DATA = Path(__file__).resolve().parents[1] / "data"
PUBLISHED = {
    "steps": 10,
    "lr": 5e-4,
    "nll_weight": 0.1,
    "kl_weight": 1.0,
    "train_on_question": False,
    "benign_kl_weight": 0.0,
    "stop_nll": 0.0,
    "stop_match": 0,
    "benign_projection": 0.0,
    "harmful_nll_weight": 0.0,
    "harmful_match": 0,
    "locate_skip": 0,
    "answer_tokens": None,
    "layers": 1,
    "layer": None,
    "suffix_system_prompt": None,
}


def test_paper_preset_is_the_published_algorithm():
    params = DinmParams(preset="paper")
    assert {k: getattr(params, k) for k in PUBLISHED} == PUBLISHED
    assert DinmParams.parse({"preset": "paper"}) == params


def test_default_preset_is_applied_and_explicit_fields_override_it():
    default = DinmParams()
    assert default.preset == DEFAULT_PRESET != "paper"
    assert all(getattr(default, k) == v for k, v in PRESETS[DEFAULT_PRESET].items())
    mixed = DinmParams.parse({"steps": 3, "benign_kl_weight": 0})
    assert mixed.steps == 3 and mixed.benign_kl_weight == 0
    assert mixed.lr == PRESETS[DEFAULT_PRESET]["lr"]  # the rest still from the preset
    paper = DinmParams.parse({"preset": "paper", "train_on_question": True, "lr": 1e-2})
    assert paper.train_on_question and paper.lr == 1e-2 and paper.steps == 10


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"preset": "best"}, "params.preset"),
        ({"preset": "contrastive", "stop_nll": -1}, "params.stop_nll"),
        ({"preset": "contrastive", "train_on_question": "sometimes"}, "params.train_on_question"),
        ({"preset": "contrastive", "benign_kl_weight": -0.5}, "params.benign_kl_weight"),
        ({"preset": "contrastive", "benign_kl_weight": 101}, "params.benign_kl_weight"),
        ({"preset": "contrastive", "benign_prompts": 0}, "params.benign_prompts"),
        ({"preset": "contrastive", "benign_prompts": 65}, "params.benign_prompts"),
        ({"preset": "contrastive", "layers": 0}, "params.layers"),
        ({"preset": "contrastive", "layers": 9}, "params.layers"),
        ({"preset": "contrastive", "answer_tokens": 0}, "params.answer_tokens"),
        ({"preset": "contrastive", "harmful_nll_weight": -1}, "params.harmful_nll_weight"),
        ({"preset": "contrastive", "harmful_prompts": 0}, "params.harmful_prompts"),
        ({"preset": "contrastive", "harmful_match": 9}, "params.harmful_match"),
        ({"preset": "paper", "harmful_match": 1}, "params: harmful_match needs stop_match"),
        ({"preset": "contrastive", "stop_match": 0, "harmful_match": 1}, "harmful_match needs"),
    ],
)
def test_new_knobs_are_validated(params, field):
    with pytest.raises(InputError, match=field):
        DinmParams.parse(params)


def test_a_preset_s_harmful_match_gives_way_when_its_stop_is_turned_off():
    assert DinmParams.parse({"preset": "contrastive", "stop_match": 0}).harmful_match == 1
    assert DinmParams.parse(
        {"preset": "paper", "harmful_nll_weight": 0.1, "stop_match": 2, "harmful_match": 1}
    )


def test_retain_set_is_packaged_and_disjoint_from_the_evaluation_prompts():
    retain = benign_retain_set()
    assert len(retain) >= 30 and all(prompt and answer for prompt, answer in retain)
    for name in ("benign_prompts.json", "benign_heldout.json"):
        evaluation = json.loads((DATA / name).read_text())
        assert len(evaluation) >= 30 and not set(evaluation) & {prompt for prompt, _ in retain}
    assert sum(any(w in p.lower() for w in ("kill", "shoot", "blow")) for p, _ in retain) >= 3


def test_harmful_set_is_packaged_refused_and_disjoint_from_every_evaluation_input():
    from app.ml.judges import is_refusal
    from app.ml.safeedit import load_instances

    harmful = harmful_retain_set()
    assert len(harmful) >= 30 and all(is_refusal(answer) for _, answer in harmful)
    prompts = {prompt for prompt, _ in harmful}
    assert not prompts & {prompt for prompt, _ in benign_retain_set()}
    assert not prompts & set(json.loads((DATA / "benign_prompts.json").read_text()))
    cases = Path(dinm_module.__file__).parent / "data" / "safeedit_cases.json"
    evaluated = set()
    for case in load_instances(cases):
        evaluated |= {case.question, case.adversarial_prompt}
        evaluated |= set(case.generalization.model_dump().values())
    assert not {p.lower() for p in prompts} & {e.lower() for e in evaluated if e}


def _sequences_seen(monkeypatch, params, instance=INSTANCE):
    seen = []

    class Spy(FastRunner):
        def __init__(self, lm, layer, sequences, **kwargs):
            seen.append(len(sequences))
            super().__init__(lm, layer, sequences, **kwargs)

    monkeypatch.setattr(dinm_module, "FastRunner", Spy)
    dinm_edit(
        tiny_model("llama"), instance, DinmParams(**{"preset": "contrastive", "steps": 2} | params)
    )
    return seen[0]


def test_training_on_the_question_adds_a_sequence(monkeypatch):
    base = {"preset": "paper"}
    assert _sequences_seen(monkeypatch, base) == 2
    assert _sequences_seen(monkeypatch, base | {"train_on_question": True}) == 3
    no_question = INSTANCE.model_copy(update={"question": None})
    assert _sequences_seen(monkeypatch, base | {"train_on_question": True}, no_question) == 2
    # One benign group per step (steps=2), and one harmful group per step.
    assert _sequences_seen(monkeypatch, base | {"benign_kl_weight": 1.0}) == 4
    assert _sequences_seen(monkeypatch, base | {"harmful_nll_weight": 1.0}) == 4


def _encode(lm, prompt, answer):
    return encode_prompt_answer(
        lm.tokenizer, chat_text(lm.tokenizer, prompt), answer, max_length=200
    )


def test_padded_benign_group_gives_each_row_its_own_logits():
    lm = tiny_model("llama")
    pairs = [_encode(lm, p, a) for p, a in benign_retain_set()[:3]]
    (group,) = answer_groups(pairs, size=3, count=1, pad_id=0)
    width = group.input_ids.shape[1]
    rows = PlainRunner(lm, 0, [group.input_ids]).rows_logits(0, width)
    for r, (_, end) in enumerate(group.spans):
        (pair,) = [p for p in pairs if torch.equal(p.input_ids[0, :end], group.input_ids[r, :end])]
        alone = PlainRunner(lm, 0, [pair.input_ids[:, :end]]).logits(0, end)
        torch.testing.assert_close(rows[r, :end], alone, rtol=1e-4, atol=1e-5)
    # The mask selects exactly the positions that predict each row's constrained answer tokens.
    mask = group.mask()
    assert mask.sum().item() == sum(end - start for start, end in group.spans)


def test_benign_kl_term_has_a_gradient_on_the_tuned_weight():
    lm = tiny_model("llama")
    nll_seq = _encode(lm, INSTANCE.adversarial_prompt, INSTANCE.safe_generation)
    kc = INSTANCE.knowledge_constraint
    kl_seq = _encode(lm, kc.prompt, kc.answer)
    pairs = [_encode(lm, p, a) for p, a in benign_retain_set()]
    groups = answer_groups(pairs, size=4, count=2, pad_id=0)
    module = lm.adapter.mlp_out(2)
    shift = WeightShift(module.weight)
    torch.nn.utils.parametrize.register_parametrization(module, "weight", shift, unsafe=True)
    try:
        sequences = [nll_seq.input_ids, kl_seq.input_ids, *(g.input_ids for g in groups)]
        objective = DinmObjective(FastRunner(lm, 2, sequences), nll_seq, kl_seq, benign=groups)
        assert objective.step(0).benign_kl.item() == pytest.approx(0.0, abs=1e-6)
        with torch.no_grad():
            shift.delta.normal_(std=0.05)
        kl = objective.step(1).benign_kl
        assert kl.item() > 0
        kl.backward()
        assert shift.delta.grad is not None and shift.delta.grad.abs().sum() > 0
    finally:
        torch.nn.utils.parametrize.remove_parametrizations(module, "weight", False)


def test_harmful_nll_reads_the_refusal_tokens_and_is_lowered_by_the_edit():
    lm = tiny_model("llama")
    pairs = [_encode(lm, p, a) for p, a in harmful_retain_set()[:3]]
    (group,) = answer_groups(pairs, size=3, count=1, pad_id=0)
    targets = group.targets()
    assert targets.shape[0] == group.mask().sum().item()
    first = group.spans[0]
    assert torch.equal(targets[: first[1] - first[0]], group.input_ids[0, first[0] : first[1]])
    # The term is the cross-entropy of exactly those tokens at exactly those positions.
    nll_seq = _encode(lm, INSTANCE.adversarial_prompt, INSTANCE.safe_generation)
    kl_seq = _encode(lm, INSTANCE.knowledge_constraint.prompt, INSTANCE.knowledge_constraint.answer)
    runner = PlainRunner(lm, 0, [nll_seq.input_ids, kl_seq.input_ids, group.input_ids])
    objective = DinmObjective(runner, nll_seq, kl_seq, harmful=[group])
    with torch.no_grad():
        logits = runner.rows_logits(2, group.input_ids.shape[1])
        expected = torch.cat(
            [
                torch.nn.functional.cross_entropy(
                    logits[r, s - 1 : e - 1], group.input_ids[r, s:e], reduction="none"
                )
                for r, (s, e) in enumerate(group.spans)
            ]
        ).mean()
        torch.testing.assert_close(objective.step(0).harmful_nll, expected, rtol=1e-4, atol=1e-5)


def test_harmful_nll_changes_the_result_towards_refusing_the_other_requests():
    lm = tiny_model("llama")
    params = {"preset": "paper", "steps": 6, "lr": 5e-2, "layer": 2, "nll_weight": 0.0}
    pairs = [_encode(lm, p, a) for p, a in harmful_retain_set()]
    groups = answer_groups(pairs, size=len(pairs), count=1, pad_id=0)

    def refusal_nll(delta=None) -> float:
        from app.ml.deltas import applied

        runner = PlainRunner(lm, 0, [groups[0].input_ids])
        with torch.no_grad(), applied(lm.model, [delta] if delta else []):
            logits = runner.rows_logits(0, groups[0].keep, groups[0].mask())
            return torch.nn.functional.cross_entropy(logits, groups[0].targets()).item()

    free = dinm_edit(lm, INSTANCE, DinmParams(**params))
    pushed = dinm_edit(
        lm, INSTANCE, DinmParams(**params, harmful_nll_weight=1.0, harmful_prompts=8)
    )
    assert refusal_nll(pushed.delta) < refusal_nll(free.delta) - 0.1
    assert refusal_nll(pushed.delta) < refusal_nll() - 0.1


def test_benign_kl_changes_the_result():
    lm = tiny_model("llama")
    params = {"preset": "paper", "steps": 6, "lr": 5e-2, "layer": 2}
    free = dinm_edit(lm, INSTANCE, DinmParams(**params))
    held = dinm_edit(lm, INSTANCE, DinmParams(**params, benign_kl_weight=5.0))
    name = free.delta.params[0]
    assert not torch.allclose(free.delta.updates[name].value, held.delta.updates[name].value)


def test_stop_on_target_nll():
    lm = tiny_model("llama")
    assert (
        len(
            dinm_edit(
                lm, INSTANCE, DinmParams(preset="contrastive", steps=10, stop_nll=100.0)
            ).losses
        )
        == 1
    )
    assert (
        len(dinm_edit(lm, INSTANCE, DinmParams(preset="contrastive", steps=3, stop_loss=0)).losses)
        == 3
    )


def test_several_layers_are_edited_together():
    lm = tiny_model("llama")
    result = dinm_edit(lm, INSTANCE, DinmParams(preset="contrastive", steps=2, layers=2))
    assert len(set(result.layers)) == 2 and result.layer == result.layers[0]
    assert sorted(result.delta.params) == sorted(
        lm.adapter.mlp_out_param_name(i) for i in result.layers
    )
    ranked = sorted(range(len(result.distances)), key=lambda i: -result.distances[i])
    assert result.layers == ranked[:2]
    fixed = dinm_edit(lm, INSTANCE, DinmParams(preset="contrastive", steps=2, layers=2, layer=1))
    assert fixed.layers == [1, 2]


def test_benign_recordings_are_reused_and_dropped_when_the_weights_change():
    from app.ml import runners

    lm = tiny_model("llama")
    params = DinmParams(preset="contrastive", steps=3, layer=2)
    first = dinm_edit(lm, INSTANCE, params)
    assert runners._RECORDINGS.values
    recorded = dict(runners._RECORDINGS.values)
    again = dinm_edit(lm, INSTANCE, params)  # from the recordings: the same result
    assert all(runners._RECORDINGS.values[k] is v for k, v in recorded.items())
    name = first.delta.params[0]
    torch.testing.assert_close(first.delta.updates[name].value, again.delta.updates[name].value)
    with torch.no_grad():
        lm.model.model.layers[0].mlp.down_proj.weight.mul_(2.0)  # the weights below change
    plain = dinm_edit(lm, INSTANCE, params.model_copy(update={"fast_path": False}))
    fast = dinm_edit(lm, INSTANCE, params)
    assert all(runners._RECORDINGS.values.get(k) is not v for k, v in recorded.items())
    torch.testing.assert_close(
        fast.delta.updates[name].value, plain.delta.updates[name].value, rtol=1e-4, atol=1e-6
    )


def test_pre_edit_benign_distributions_are_kept_until_any_weight_changes():
    lm = tiny_model("llama")
    params = DinmParams(
        preset="contrastive", steps=3, layer=2, benign_kl_weight=1.0, benign_prompts=2
    )
    name = lm.adapter.mlp_out_param_name(2)
    dinm_module._BENIGN_PRE.values.clear()
    fresh = dinm_edit(lm, INSTANCE, params).delta.updates[name].value
    kept = dict(dinm_module._BENIGN_PRE.values)
    assert len(kept) == 3  # one per step's group
    again = dinm_edit(lm, INSTANCE, params).delta.updates[name].value
    assert all(dinm_module._BENIGN_PRE.values[k] is v for k, v in kept.items())
    torch.testing.assert_close(again, fresh)
    with torch.no_grad():  # the edited projection itself: the recordings stay, these must not
        lm.model.model.layers[2].mlp.down_proj.weight.mul_(1.5)
    after = dinm_edit(lm, INSTANCE, params).delta.updates[name].value
    assert all(dinm_module._BENIGN_PRE.values[k] is not v for k, v in kept.items())
    dinm_module._BENIGN_PRE.values.clear()
    recomputed = dinm_edit(lm, INSTANCE, params).delta.updates[name].value
    torch.testing.assert_close(after, recomputed)
    assert not torch.allclose(after, fresh)


def test_answer_tokens_cuts_the_trained_safe_response(monkeypatch):
    widths = []

    class Spy(FastRunner):
        def __init__(self, lm, layer, sequences, **kwargs):
            widths.append([ids.shape[1] for ids in sequences])
            super().__init__(lm, layer, sequences, **kwargs)

    monkeypatch.setattr(dinm_module, "FastRunner", Spy)
    lm = tiny_model("llama")
    params = {"preset": "paper", "steps": 1, "train_on_question": True}
    dinm_edit(lm, INSTANCE, DinmParams(**params))
    dinm_edit(lm, INSTANCE, DinmParams(**params, answer_tokens=3))
    full, cut = widths
    assert cut[1] == full[1]  # the knowledge constraint is untouched
    answer = len(lm.tokenizer(INSTANCE.safe_generation, add_special_tokens=False)["input_ids"])
    assert full[0] - cut[0] == full[2] - cut[2] == answer + 1 - 3  # + the end-of-sequence token


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"stop_match": -1}, "params.stop_match"),
        ({"benign_projection": 1.0}, "params.benign_projection"),
        ({"benign_projection": -0.1}, "params.benign_projection"),
        ({"locate_skip": -1}, "params.locate_skip"),
    ],
)
def test_selective_knobs_are_validated(params, field):
    with pytest.raises(InputError, match=field):
        DinmParams.parse({"preset": "contrastive"} | params)


def test_locator_can_leave_out_the_first_position():
    from app.ml.dinm_locate import layer_distances

    lm = tiny_model("llama")
    full = layer_distances(lm, INSTANCE)
    rest = layer_distances(lm, INSTANCE, skip=1)
    assert len(rest) == len(full) and all(r <= f + 1e-4 for r, f in zip(rest, full, strict=True))
    assert rest != pytest.approx(full, rel=1e-6)
    params = {"preset": "paper", "steps": 1}
    assert dinm_edit(lm, INSTANCE, DinmParams(**params, locate_skip=1)).distances == (
        pytest.approx(rest, rel=1e-5)
    )


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_projected_update_leaves_the_benign_inputs_alone(family):
    from app.ml.null_space import benign_directions, benign_inputs

    lm = tiny_model(family)
    params = DinmParams(preset="paper", steps=3, lr=5e-2, layer=1, benign_projection=0.9)
    result = dinm_edit(lm, INSTANCE, params)
    (name,) = result.delta.params
    update = result.delta.updates[name].value.float()
    assert update.abs().sum() > 0
    pairs = [_encode(lm, p, a) for p, a in benign_retain_set()]
    basis = benign_directions(lm, 1, pairs, 0.9)
    assert 0 < basis.shape[1] < basis.shape[0]
    assert torch.allclose(basis.T @ basis, torch.eye(basis.shape[1]), atol=1e-5)  # orthonormal
    kept = basis @ basis.T  # the benign directions
    moved = kept @ update if lm.adapter.spec.transposed else update @ kept
    assert moved.abs().max() < 1e-5 * max(update.abs().max().item(), 1.0)
    rows = benign_inputs(lm, lm.adapter.mlp_out(1), pairs)
    assert len(rows) == len(pairs) and rows[0].shape[1] == basis.shape[0]
    # The basis is cached: the same object for the same weights.
    assert benign_directions(lm, 1, pairs, 0.9) is basis


def test_stop_can_wait_for_the_harmful_refusals_too():
    lm = tiny_model("llama")
    params = {"preset": "paper", "steps": 6, "layer": 2, "lr": 0.5, "stop_match": 1}
    alone = dinm_edit(lm, INSTANCE, DinmParams(**params, harmful_nll_weight=0.1))
    assert len(alone.losses) < 6
    # A random tiny model never starts all 4 refusals of a group with their first 8 tokens.
    waits = dinm_edit(lm, INSTANCE, DinmParams(**params, harmful_nll_weight=0.1, harmful_match=8))
    assert len(waits.losses) == 6


def test_stop_on_greedy_match():
    lm = tiny_model("llama")
    params = {"preset": "paper", "steps": 8, "layer": 2}
    # Any model predicts at least zero leading tokens: "0 tokens" is off, and a huge lr makes the
    # first token the most likely quickly.
    assert len(dinm_edit(lm, INSTANCE, DinmParams(**params)).losses) == 8
    fast = dinm_edit(lm, INSTANCE, DinmParams(**params, lr=0.5, stop_match=1))
    assert len(fast.losses) < 8
