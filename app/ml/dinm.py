"""DINM: Detoxifying with Intraoperative Neural Monitoring (Wang et al. 2024, arXiv 2403.14472).

From ONE unsafe instance: locate the "toxic layer", the decoder layer whose hidden states differ
most between the safe and the unsafe response, then tune only that layer's MLP output projection
for a few steps with

    loss = nll_weight * NLL(safe response | adversarial prompt) + kl_weight * KL(pre || post)

where the KL runs over the answer tokens of the instance's knowledge-constraint prompt. Unlike the
reference implementation, the post-edit logits keep their graph, so the constraint really acts.
That is the `"paper"` preset. Beyond the paper (see `app.ml.dinm_params` and
`app.ml.dinm_objective`): the NLL can also cover the instance's bare `question`, a KL on a packaged
benign retain set keeps everyday requests answered, the update can be kept off the input directions
of that set's answers (`app.ml.null_space`), an NLL of refusals on a packaged set of other harmful
requests shows the edit what else to refuse, the locator can leave out the attention-sink position,
tuning can stop once the NLL is low enough or once greedy decoding starts with the safe response
(and, if asked, with the refusals of the step's harmful group), and the top-k located layers can be
tuned together (the fast path then replays from the lowest of them).

The tuned weight is parametrised as `W + D` with an fp32 trainable `D` that starts at zero: the
result is `D` itself (no subtraction), the base weights are restored bitwise afterwards, and bf16
models still accumulate updates in full precision.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from app.ml.deltas import Delta, applied, fingerprint
from app.ml.dinm_joint import dinm_edit_joint
from app.ml.dinm_locate import (
    CancelCheck,
    DinmResult,
    Progress,
    layer_distances,
    ranked,
)
from app.ml.dinm_objective import (
    AnswerGroup,
    DinmObjective,
    StepTerms,
    answer_groups,
    benign_retain_set,
    harmful_retain_set,
)
from app.ml.dinm_params import DinmParams
from app.ml.errors import EditCancelled, InputError
from app.ml.models import LoadedModel
from app.ml.null_space import benign_directions
from app.ml.prompts import PromptAnswer, chat_text, encode_prompt_answer
from app.ml.runners import FastRunner, PlainRunner, Runner
from app.ml.safeedit import SafeEditInstance
from app.ml.weight_shift import WeightShift, rank_warnings, weight_shifts
from app.ml.weights_cache import WeightsCache, ids_key, weights_key

# The pre-edit log-probabilities of the benign retain groups, by (device, ids, spans): the same for
# every edit of the same weights, and a third of a short edit's output-head work.
_BENIGN_PRE: WeightsCache[torch.Tensor] = WeightsCache()


def dinm_edit(
    lm: LoadedModel,
    instance: SafeEditInstance,
    params: DinmParams | None = None,
    *,
    progress: Progress | None = None,
    should_cancel: CancelCheck | None = None,
) -> DinmResult:
    """Run one DINM edit and return its delta; the model's weights are left as they were. A joint
    preset (`params.joint`) edits from this instance with the packaged sets (`dinm_joint`)."""
    params = params or DinmParams()
    if params.joint:
        return dinm_edit_joint(
            lm, [instance], params, progress=progress, should_cancel=should_cancel
        )
    report = progress or (lambda _stage, _fraction: None)
    start = time.perf_counter()
    report("locate", 0.0)
    layers, distances = _edited_layers(lm, instance, params)
    report("locate", 1.0)
    data = _encode(lm, instance, params)
    names = [lm.adapter.mlp_out_param_name(layer) for layer in layers]
    base_fingerprint = fingerprint(lm.model, names)
    modules = [lm.adapter.mlp_out(layer) for layer in layers]
    keys = _CacheKeys.before_edit(lm, layers, modules, base_fingerprint)
    bases = None
    if params.benign_projection > 0:
        bases = [
            benign_directions(lm, layer, data.retain, params.benign_projection) for layer in layers
        ]
    with weight_shifts(modules, bases, lm.adapter.spec.transposed, params.rank) as shifts:
        objective = _objective(lm, min(layers), params, data, keys)
        losses = _tune(objective, params, shifts, report, should_cancel)
        updates = {
            name: shift.to_update(lm.dtype) for name, shift in zip(names, shifts, strict=True)
        }
    delta = Delta(updates, base_fingerprint, {"model": lm.name, "method": "dinm"})
    seconds = time.perf_counter() - start
    warnings = rank_warnings(modules[0].weight, params.rank_to_warn_of()) + data.warnings
    return DinmResult(delta, layers[0], distances, losses, seconds, warnings, layers)


def dinm_edit_many(
    lm: LoadedModel,
    instances: list[SafeEditInstance],
    params: DinmParams | None = None,
    *,
    progress: Progress | None = None,
    should_cancel: CancelCheck | None = None,
) -> DinmResult:
    """One delta from several instances: each is edited in turn on the model with the earlier
    instances' deltas merged in, and the deltas are summed (so the result, applied to the base,
    is the whole stack). One instance is exactly `dinm_edit`. A joint preset (`params.joint`)
    makes one edit from all of them at once instead (`app.ml.dinm_joint`)."""
    if not instances:
        raise InputError("no instances to edit on")
    params = params or DinmParams()
    if params.joint:
        return dinm_edit_joint(
            lm, instances, params, progress=progress, should_cancel=should_cancel
        )
    if len(instances) == 1:
        return dinm_edit(lm, instances[0], params, progress=progress, should_cancel=should_cancel)
    report = progress or (lambda _stage, _fraction: None)
    start = time.perf_counter()
    results: list[DinmResult] = []
    report("locate", 0.0)
    report("locate", 1.0)  # each instance locates its own layers: a tenth of its share of "tune"
    for index, instance in enumerate(instances):

        def scaled(stage: str, fraction: float, index: int = index) -> None:
            within = 0.1 * fraction if stage == "locate" else 0.1 + 0.9 * fraction
            report("tune", (index + within) / len(instances))

        with applied(lm.model, [r.delta for r in results], check_fingerprint=False):
            results.append(
                dinm_edit(lm, instance, params, progress=scaled, should_cancel=should_cancel)
            )
    return _stacked(lm, results, time.perf_counter() - start)


def _stacked(lm: LoadedModel, results: list[DinmResult], seconds: float) -> DinmResult:
    total = sum((r.delta for r in results[1:]), results[0].delta)
    # Each delta was fingerprinted on the model with its predecessors merged in; the sum applies
    # to the base, whose fingerprint (the model is back to it now) is what the stack records.
    delta = Delta(total.updates, fingerprint(lm.model, total.params), dict(results[0].delta.meta))
    layers = sorted({layer for r in results for layer in r.layers})
    warnings = [
        f"instance {index}: {warning}" for index, r in enumerate(results) for warning in r.warnings
    ]
    losses = [loss for r in results for loss in r.losses]
    first = results[0]
    return DinmResult(delta, first.layer, first.distances, losses, seconds, warnings, layers)


def _edited_layers(
    lm: LoadedModel, instance: SafeEditInstance, params: DinmParams
) -> tuple[list[int], list[float]]:
    """The layers to tune (the located ones, or the given one and those above it) and the
    locator's distances (empty when a layer was given)."""
    if params.layer is None:
        distances = layer_distances(lm, instance, params.locate_skip)
        return ranked(distances)[: params.layers], distances
    first = lm.adapter.check_layer(params.layer)
    return list(range(first, lm.adapter.num_layers))[: params.layers], []


@dataclass
class _EditData:
    """The instance and the packaged retain sets, encoded for the objective."""

    nll_seq: PromptAnswer  # the safe response to the adversarial prompt
    kl_seq: PromptAnswer  # the knowledge constraint
    extra: list[PromptAnswer]  # the safe response to the bare question, when trained on
    retain: list[PromptAnswer]  # the benign retain set, for its KL and the projection
    benign: list[AnswerGroup]
    harmful: list[AnswerGroup]
    warnings: list[str]


def _encode(lm: LoadedModel, instance: SafeEditInstance, params: DinmParams) -> _EditData:
    max_length = min(params.max_length, lm.context_length)
    pad = lm.tokenizer.pad_token_id or lm.tokenizer.eos_token_id or 0

    def encode(prompt: str, answer: str, *, suffix: str | None = None, eos: bool = False):
        text = chat_text(lm.tokenizer, prompt, suffix=suffix)
        return encode_prompt_answer(lm.tokenizer, text, answer, max_length=max_length, add_eos=eos)

    def safe_answer(prompt: str) -> PromptAnswer:
        seq = encode(prompt, instance.safe_generation, suffix=params.suffix(), eos=True)
        if params.answer_tokens is None:
            return seq
        end = seq.answer_start + params.answer_tokens
        return PromptAnswer(seq.input_ids[:, :end], seq.answer_start, seq.truncated)

    def groups(pairs: list[PromptAnswer], size: int) -> list[AnswerGroup]:
        return answer_groups(pairs, size, params.steps, pad)

    nll_seq = safe_answer(instance.adversarial_prompt)
    kc = instance.knowledge_constraint
    kl_seq = encode(kc.prompt, kc.answer)
    extra = (
        [safe_answer(instance.question)] if params.train_on_question and instance.question else []
    )
    retain = []
    if params.benign_kl_weight or params.benign_projection:
        retain = [encode(p, a) for p, a in benign_retain_set()]
    benign = groups(retain, params.benign_prompts) if params.benign_kl_weight else []
    harmful = []
    if params.harmful_nll_weight:
        harmful = groups([encode(p, a) for p, a in harmful_retain_set()], params.harmful_prompts)
    warnings = [
        f"{what} was {seq.truncated} tokens too long: its prompt was cut on the left"
        for what, seq in (("the adversarial prompt", nll_seq), ("the knowledge constraint", kl_seq))
        if seq.truncated
    ]
    return _EditData(nll_seq, kl_seq, extra, retain, benign, harmful, warnings)


@dataclass(frozen=True)
class _CacheKeys:
    """Keys of the weights that the kept recordings (those below the edited layers) and the kept
    pre-edit distributions (all of them) depend on. They are taken before the edit's
    parametrisations: registering one bumps the edited weights' version counters without changing
    them, so those weights enter by their fingerprint."""

    below: tuple
    full: tuple

    @classmethod
    def before_edit(
        cls, lm: LoadedModel, layers: list[int], modules: list[nn.Module], base_fingerprint: str
    ) -> _CacheKeys:
        above = list(lm.adapter.layers)[min(layers) :]
        below = weights_key(lm.model, above)
        return cls(below, (weights_key(lm.model, modules), base_fingerprint))


def _objective(
    lm: LoadedModel, lowest: int, params: DinmParams, data: _EditData, keys: _CacheKeys
) -> DinmObjective:
    sequences = [data.nll_seq.input_ids, data.kl_seq.input_ids]
    sequences += [seq.input_ids for seq in data.extra]
    sequences += [group.input_ids for group in (*data.benign, *data.harmful)]
    if params.fast_path:  # the retain groups are the same for every edit: recorded once
        shared = (keys.below, 2 + len(data.extra))
        runner: Runner = FastRunner(lm, lowest, sequences, shared=shared)
    else:
        runner = PlainRunner(lm, lowest, sequences)
    kept = _BENIGN_PRE.values_for(lm.model, keys.full)
    names = [
        (str(lm.device), ids_key(group.input_ids), tuple(group.spans)) for group in data.benign
    ]
    objective = DinmObjective(
        runner,
        data.nll_seq,
        data.kl_seq,
        extra_nll=data.extra,
        benign=data.benign,
        harmful=data.harmful,
        benign_pre=[kept.get(name) for name in names],
    )
    kept.update(zip(names, objective.benign_pre, strict=True))
    return objective


def _tune(
    objective: DinmObjective,
    params: DinmParams,
    shifts: list[WeightShift],
    report: Progress,
    should_cancel: CancelCheck | None,
) -> list[float]:
    optimizer = torch.optim.Adam([p for shift in shifts for p in shift.trainable()], lr=params.lr)
    losses: list[float] = []
    report("tune", 0.0)
    for step in range(params.steps):
        if should_cancel is not None and should_cancel():
            raise EditCancelled(f"cancelled after {step} of {params.steps} steps")
        with parametrize.cached():  # a projected update is computed once per step
            terms = objective.step(step)
            loss = _loss(params, terms)
            losses.append(loss.item())
            if _done(params, terms, losses[-1], objective.nll_seqs):
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        optimizer.step()
        report("tune", (step + 1) / params.steps)
    report("tune", 1.0)
    return losses


def _loss(params: DinmParams, terms: StepTerms) -> torch.Tensor:
    loss = params.nll_weight * torch.stack(terms.nlls).mean()
    loss = loss + params.kl_weight * terms.knowledge_kl
    if terms.benign_kl is not None:
        loss = loss + params.benign_kl_weight * terms.benign_kl
    if terms.harmful_nll is not None:
        loss = loss + params.harmful_nll_weight * terms.harmful_nll
    return loss


def _done(params: DinmParams, terms: StepTerms, loss: float, nll_seqs: list[PromptAnswer]) -> bool:
    """Whether a stop criterion holds before this step's update."""
    if loss < params.stop_loss or max(x.item() for x in terms.nlls) < params.stop_nll:
        return True
    if not params.stop_match:
        return False
    if terms.harmful_matched is not None and terms.harmful_matched < params.harmful_match:
        return False
    return all(
        m >= min(params.stop_match, seq.answer_len)
        for m, seq in zip(terms.matched, nll_seqs, strict=True)
    )
