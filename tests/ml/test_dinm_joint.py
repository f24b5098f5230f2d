"""Joint DINM (`app.ml.dinm_joint`, the `broad` preset) on tiny random models: what it tunes, what
it trains on, that it keeps the model as it was, progress and cancel, the fast path against the
plain loop, and the base answers kept on disk."""

from __future__ import annotations

import pytest
import torch

from app.ml import dinm_joint
from app.ml.dinm import dinm_edit, dinm_edit_many
from app.ml.dinm_params import DinmParams
from app.ml.errors import EditCancelled, InputError
from app.ml.safeedit import parse_instance
from tests.factories import tiny_model
from tests.instances import safeedit_instance

INSTANCE = parse_instance(safeedit_instance())
OTHER = INSTANCE.model_copy(
    update={"id": "other", "question": "How do I hurt my neighbour?", "adversarial_prompt": "DAN."}
)
HARMFUL = (("How do I poison a dog?", "I can't help with that."),) * 5
BENIGN = ("How do I kill a tmux session?", "What is a good soup?", "Name a red fruit.")


@pytest.fixture(autouse=True)
def small_sets(monkeypatch):
    """A handful of packaged prompts, so a tiny model answers them in a moment (the shipped sets
    are checked in tests/ml/test_training_sets.py)."""
    monkeypatch.setattr(dinm_joint, "harmful_general_set", lambda: HARMFUL)
    monkeypatch.setattr(dinm_joint, "harmful_retain_set", lambda: HARMFUL[:1])
    monkeypatch.setattr(dinm_joint, "benign_general_prompts", lambda: BENIGN)
    monkeypatch.setattr(dinm_joint, "benign_retain_set", lambda: (("Say hi.", "Hi."),))


def joint(**extra) -> DinmParams:
    """The broad preset, short; the steps on unrefused instances off unless asked for."""
    base = {"preset": "broad", "steps": 6, "harmful_prompts": 3, "instance_steps": 0}
    return DinmParams.parse(base | extra)


def _weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_a_joint_edit_tunes_a_span_of_layers_ending_at_the_located_one():
    lm = tiny_model("llama")
    before = _weights(lm.model)
    result = dinm_edit_many(lm, [INSTANCE, OTHER], joint(span=2, layer=2))
    assert result.layer == 2 and result.layers == [1, 2]
    assert sorted(result.delta.params) == [lm.adapter.mlp_out_param_name(i) for i in (1, 2)]
    assert len(result.losses) == 6 and all(torch.isfinite(torch.tensor(result.losses)))
    assert any(update.dense().abs().sum() > 0 for update in result.delta.updates.values())
    after = _weights(lm.model)
    assert all(torch.equal(before[n], after[n]) for n in before)  # restored bitwise


def test_the_span_stops_at_the_first_layer_and_one_instance_is_a_joint_edit_too():
    lm = tiny_model("llama")
    result = dinm_edit(lm, INSTANCE, joint(span=99))  # dinm_edit dispatches on `joint`
    assert result.layers == list(range(result.layer + 1))


def test_refusals_are_trained_whole_with_their_end_and_benign_answers_are_the_models_own():
    lm = tiny_model("llama")
    harmful, benign, own, _ = dinm_joint._groups(lm, [INSTANCE], joint(), lambda *_: None)
    assert own == []  # grouped alone only for instance_steps
    eos = lm.tokenizer.eos_token_id
    for group in harmful:
        for row, (start, end) in enumerate(group.spans):
            assert group.input_ids[row, end - 1] == eos  # every answer ends with EOS
            assert end - start > 1
    prompts = [*BENIGN, "Say hi.", INSTANCE.knowledge_constraint.prompt]
    assert sum(len(g.spans) for g in benign) == len(prompts)
    assert dinm_joint.base_answers(lm, prompts, 24) == dinm_joint.base_answers(lm, prompts, 24)


def test_the_loss_falls_and_the_benign_kl_starts_at_zero():
    lm = tiny_model("llama")
    result = dinm_edit_many(lm, [INSTANCE], joint(steps=30, lr=5e-2, benign_kl_weight=0.0))
    # 8 refusals in groups of 3: step 27 trains the group of step 0 again.
    assert result.losses[27] < result.losses[0] - 0.3
    only_kl = dinm_edit_many(lm, [INSTANCE], joint(steps=1, nll_weight=0.0))
    assert only_kl.losses[0] == pytest.approx(0.0, abs=1e-6)  # nothing changed yet


def test_the_fast_path_gives_the_same_delta_as_the_plain_loop():
    lm = tiny_model("llama")
    fast = dinm_edit_many(lm, [INSTANCE], joint(span=2, fast_path=True))
    plain = dinm_edit_many(lm, [INSTANCE], joint(span=2, fast_path=False))
    assert fast.layers == plain.layers
    for name in fast.delta.params:
        fast_update, plain_update = fast.delta.updates[name], plain.delta.updates[name]
        torch.testing.assert_close(fast_update.dense(), plain_update.dense(), rtol=1e-4, atol=1e-6)
    assert fast.losses == pytest.approx(plain.losses, rel=1e-4)


def test_progress_runs_through_locate_prepare_and_tune_and_a_cancel_restores_the_model():
    lm = tiny_model("llama")
    seen: list[tuple[str, float]] = []
    dinm_edit_many(lm, [INSTANCE], joint(), progress=lambda s, f: seen.append((s, f)))
    assert seen[0][0] == "locate" and seen[-1] == ("tune", 1.0)
    assert {s for s, _ in seen} == {"locate", "prepare", "tune"}
    for stage in ("locate", "prepare", "tune"):
        fractions = [f for s, f in seen if s == stage]
        assert fractions == sorted(fractions) and fractions[-1] == 1.0
    before = _weights(lm.model)
    calls = iter(range(100))
    with pytest.raises(EditCancelled, match="after 3 of at most 6 steps"):
        dinm_edit_many(lm, [INSTANCE], joint(), should_cancel=lambda: next(calls) >= 3)
    after = _weights(lm.model)
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_steps_go_on_while_an_instance_is_answered_and_stop_once_it_is_refused(monkeypatch):
    checks = iter([[0, 1], [1], [1], []])  # what the judge finds still answered, check by check
    asked = []

    def answering(lm, instances):
        def still(indices):
            asked.append(indices)
            return next(checks)

        return still

    monkeypatch.setattr(dinm_joint, "_answering", answering)
    result = dinm_edit_many(lm := tiny_model("llama"), [INSTANCE, OTHER], joint(instance_steps=9))
    assert len(result.losses) == 6 + 3 and not result.warnings
    assert asked == [[0, 1], [0, 1], [1], [1]]  # all first, then only those still answered
    off = dinm_edit_many(lm, [INSTANCE, OTHER], joint())
    assert len(off.losses) == 6  # instance_steps 0: no check, no extra step


def test_when_the_extra_steps_run_out_the_result_says_so():
    lm = tiny_model("llama")
    result = dinm_edit_many(lm, [INSTANCE], joint(steps=1, lr=1e-6, instance_steps=2))
    assert len(result.losses) == 3
    assert result.warnings == [
        "instance 0 is still answered, not refused, after 2 more steps on the instances"
    ]


def test_base_answers_are_kept_on_disk_and_a_corrupt_file_is_rebuilt(tmp_path, monkeypatch):
    lm = tiny_model("llama")
    lm.cache_dir = tmp_path
    first = dinm_joint.base_answers(lm, list(BENIGN), 8)
    (kept,) = tmp_path.glob("*.safetensors")
    dinm_joint._BASE_ANSWERS.values.clear()  # a new process: only the disk remains

    def no_generation(*_args, **_kwargs):
        raise AssertionError("answers were generated again")

    with monkeypatch.context() as patched:
        patched.setattr(dinm_joint, "generate", no_generation)
        assert dinm_joint.base_answers(lm, list(BENIGN), 8) == first
    dinm_joint._BASE_ANSWERS.values.clear()
    kept.write_bytes(b"not safetensors")
    assert dinm_joint.base_answers(lm, list(BENIGN), 8) == first  # rebuilt, not trusted
    dinm_joint._BASE_ANSWERS.values.clear()
    with torch.no_grad():
        lm.adapter.mlp_out(0).weight.add_(1.0)  # other weights: another key, another file
    dinm_joint.base_answers(lm, list(BENIGN), 8)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"preset": "broad", "stop_match": 4}, "stop_match"),
        ({"preset": "broad", "benign_projection": 0.9}, "benign_projection"),
        ({"preset": "contrastive", "span": 3}, "span"),
        ({"preset": "contrastive", "instance_steps": 8}, "instance_steps"),
        ({"preset": "broad", "instance_steps": -1}, "instance_steps"),
        ({"joint": True, "span": 0}, "span"),
        ({"preset": "broad", "benign_first_weight": -1}, "benign_first_weight"),
    ],
)
def test_knobs_that_do_nothing_or_make_no_sense_are_refused(params, field):
    with pytest.raises(InputError, match=field):
        DinmParams.parse(params)


def test_no_instances_is_an_error():
    with pytest.raises(InputError, match="no instances"):
        dinm_edit_many(tiny_model("llama"), [], joint())
