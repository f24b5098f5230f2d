"""Joint DINM: one edit from every instance at once, taught what else to refuse and what to keep.

Sequential DINM (`app.ml.dinm`) edits one instance at a time and fixes that instance and its close
paraphrases. A joint edit (`params.joint`, the `broad` preset) tunes the MLP output projections of
`span` consecutive layers, ending at the located one, on one objective:

    loss = nll_weight * NLL(refusals | harmful group)
         + benign_kl_weight * (KL(pre || post) + benign_first_weight * KL at the first position)
           on a benign group

Harmful groups hold every instance's adversarial prompt and bare question, each with the
instance's safe response, and the packaged harmful requests (`harmful_general.json`, eleven
categories, and `harmful_retain.json`) with their refusals; every answer is trained whole with
the end-of-sequence token, so a refusal learns to end instead of looping. Benign groups hold the
packaged everyday requests (`benign_general.json`, many of which only sound harmful, and
`benign_retain.json`) and the instances' knowledge-constraint prompts, each with the model's own
greedy answer before the edit: the KL keeps those answers, most of all their first token, where a
refusal would start. Step `s` takes harmful group `s mod H` and benign group `s mod B`. The
pre-edit distributions are recomputed each step with the update switched off (keeping them all
would take gigabytes), and the base answers are kept on disk beside the model cache.

The instances are a few rows among hundreds, so after the steps the model may still answer one
of them. With `instance_steps`, tuning goes on (at most that many more steps, the benign KL still
on), each step on one instance whose adversarial prompt or bare question the edited model still
answers (greedy, judged unsafe by the offline judge), until it refuses them all: a version
refuses what it was made from, where the steps allow.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from itertools import pairwise

import torch
import torch.nn.functional as F

from app.ml.deltas import Delta, fingerprint
from app.ml.dinm_locate import CancelCheck, DinmResult, Progress, layer_distances
from app.ml.dinm_objective import (
    AnswerGroup,
    answer_groups,
    benign_general_prompts,
    benign_retain_set,
    harmful_general_set,
    harmful_retain_set,
)
from app.ml.dinm_params import DinmParams
from app.ml.disk_cache import content_key, load_tensor, save_tensor
from app.ml.errors import EditCancelled, InputError
from app.ml.generation import generate
from app.ml.judges import OfflineJudge
from app.ml.models import LoadedModel
from app.ml.prompts import PromptAnswer, chat_text, encode_prompt_answer
from app.ml.runners import FastRunner, PlainRunner, Read, Runner
from app.ml.safeedit import SafeEditInstance
from app.ml.weight_shift import WeightShift, rank_warnings, shifts_disabled, weight_shifts
from app.ml.weights_cache import WeightsCache, weights_key

# New tokens of the greedy answers by which an instance is judged still answered or refused: the
# evaluation's default length (Settings.max_new_tokens), so that an answer which turns harmful
# after its first sentence is caught here and not first in the job's own report.
ANSWER_CHECK_TOKENS = 64
# The model's own answers to the benign prompts, by weights and prompts: the same for every edit.
_BASE_ANSWERS: WeightsCache[list[str]] = WeightsCache()


def dinm_edit_joint(
    lm: LoadedModel,
    instances: list[SafeEditInstance],
    params: DinmParams,
    *,
    progress: Progress | None = None,
    should_cancel: CancelCheck | None = None,
    locate: Callable[[LoadedModel, SafeEditInstance, int], list[float]] = layer_distances,
) -> DinmResult:
    """One delta from all `instances` (see the module docstring); the model is left as it was."""
    if not instances:
        raise InputError("no instances to edit on")
    report = progress or (lambda _stage, _fraction: None)
    start = time.perf_counter()
    report("locate", 0.0)
    top, distances = _top_layer(lm, instances, params, locate)
    layers = list(range(max(0, top - params.span + 1), top + 1))
    report("locate", 1.0)
    report("prepare", 0.0)
    harmful, benign, own, warnings = _groups(lm, instances, params, report)
    warnings = rank_warnings(lm.adapter.mlp_out(top).weight, params.rank_to_warn_of()) + warnings
    names = [lm.adapter.mlp_out_param_name(layer) for layer in layers]
    base_fingerprint = fingerprint(lm.model, names)
    modules = [lm.adapter.mlp_out(layer) for layer in layers]
    sequences = [group.input_ids for group in (*harmful, *benign, *own)]
    runner: Runner = (
        FastRunner(lm, layers[0], sequences) if params.fast_path else PlainRunner(lm, 0, sequences)
    )
    report("prepare", 1.0)
    with weight_shifts(modules, transposed=lm.adapter.spec.transposed, rank=params.rank) as shifts:
        objective = _JointObjective(runner, harmful, benign, own, shifts, params)
        answering = _answering(lm, instances) if params.instance_steps else None
        losses, unrefused = _tune(objective, params, report, should_cancel, answering)
        warnings += [
            f"instance {i} is still answered, not refused, after {params.instance_steps} more "
            "steps on the instances"
            for i in unrefused
        ]
        updates = {
            name: shift.to_update(lm.dtype) for name, shift in zip(names, shifts, strict=True)
        }
    delta = Delta(updates, base_fingerprint, {"model": lm.name, "method": "dinm"})
    seconds = time.perf_counter() - start
    return DinmResult(delta, top, distances, losses, seconds, warnings, layers)


def _top_layer(
    lm: LoadedModel,
    instances: list[SafeEditInstance],
    params: DinmParams,
    locate: Callable[[LoadedModel, SafeEditInstance, int], list[float]],
) -> tuple[int, list[float]]:
    """The given layer, or the layer located most often over the instances (the higher on a
    tie), with the first instance's distances."""
    if params.layer is not None:
        return lm.adapter.check_layer(params.layer), []
    found = []
    for instance in instances:
        distances = locate(lm, instance, params.locate_skip)
        found.append((max(range(len(distances)), key=lambda i: (distances[i], -i)), distances))
    votes = Counter(layer for layer, _ in found)
    top = max(votes, key=lambda layer: (votes[layer], layer))
    return top, found[0][1]


def _groups(
    lm: LoadedModel,
    instances: list[SafeEditInstance],
    params: DinmParams,
    report: Progress,
) -> tuple[list[AnswerGroup], list[AnswerGroup], list[AnswerGroup], list[str]]:
    """The harmful groups (refusals trained whole, with EOS), the benign groups (the model's
    own answers, kept), the instances' own rows grouped alone, and warnings about instances cut
    to fit."""
    max_length = min(params.max_length, lm.context_length)
    pad = lm.tokenizer.pad_token_id or lm.tokenizer.eos_token_id or 0

    def encode(prompt: str, answer: str, *, eos: bool) -> PromptAnswer:
        text = chat_text(lm.tokenizer, prompt, suffix=params.suffix())
        return encode_prompt_answer(lm.tokenizer, text, answer, max_length=max_length, add_eos=eos)

    refusals: list[tuple[str, str]] = []
    starts = []  # each instance's first row: its adversarial prompt, then its bare question
    for instance in instances:
        starts.append(len(refusals))
        refusals.append((instance.adversarial_prompt, instance.safe_generation))
        if instance.question:
            refusals.append((instance.question, instance.safe_generation))
    bounds = [*starts, len(refusals)]
    refusals += [*harmful_general_set(), *harmful_retain_set()]
    harmful_pairs = [encode(p, a, eos=True) for p, a in refusals]
    warnings = [
        f"instance {i}'s adversarial prompt was {harmful_pairs[row].truncated} tokens too long: "
        "its prompt was cut on the left"
        for i, row in enumerate(starts)
        if harmful_pairs[row].truncated
    ]
    prompts = [
        *benign_general_prompts(),
        *(p for p, _ in benign_retain_set()),
        *dict.fromkeys(i.knowledge_constraint.prompt for i in instances),
    ]
    answers = base_answers(lm, prompts, params.benign_tokens, report)
    benign_pairs = [encode(p, a, eos=False) for p, a in zip(prompts, answers, strict=True)]
    harmful = answer_groups(harmful_pairs, params.harmful_prompts, None, pad, answer_tokens=None)
    benign = answer_groups(benign_pairs, params.benign_prompts, None, pad, answer_tokens=None)
    own = []  # one group per instance: its adversarial prompt and bare question
    if params.instance_steps:
        own = [
            answer_groups(harmful_pairs[a:b], b - a, None, pad, answer_tokens=None)[0]
            for a, b in pairwise(bounds)
        ]
    return harmful, benign, own, warnings


def base_answers(
    lm: LoadedModel, prompts: list[str], tokens: int, report: Progress | None = None
) -> list[str]:
    """The model's greedy answers of at most `tokens` tokens to `prompts`, as it is now: kept in
    memory and on disk (`lm.cache_dir`) under the exact bytes of every weight."""

    def compute() -> list[str]:
        disk_key = None
        if lm.cache_dir is not None:
            facts = {"value": "base-answers", "prompts": prompts, "tokens": tokens,
                     "device": lm.device.type, "dtype": str(lm.dtype)}  # fmt: skip
            disk_key = content_key(lm.model, [], **facts)
            kept = load_tensor(lm.cache_dir, disk_key)
            if kept is not None and kept.ndim == 2 and kept.shape[0] == len(prompts):
                return _utf8_texts(kept)
        answered = generate(
            lm,
            prompts,
            max_new_tokens=tokens,
            batch_size=32,
            progress=None if report is None else (lambda f: report("prepare", 0.9 * f)),
        )
        texts = [a.text for a in answered]
        if disk_key is not None:
            save_tensor(lm.cache_dir, disk_key, _utf8_rows(texts))
        return texts

    return _BASE_ANSWERS.get(lm.model, weights_key(lm.model), (tokens, tuple(prompts)), compute)


def _utf8_rows(texts: list[str]) -> torch.Tensor:
    """Texts as one int64 tensor of UTF-8 bytes, right-padded with -1 (exact round trip)."""
    raw = [list(text.encode("utf-8")) for text in texts]
    out = torch.full((len(raw), max(map(len, raw), default=0)), -1, dtype=torch.int64)
    for row, data in enumerate(raw):
        out[row, : len(data)] = torch.tensor(data, dtype=torch.int64)
    return out


def _utf8_texts(kept: torch.Tensor) -> list[str]:
    return [bytes(v for v in row.tolist() if v >= 0).decode("utf-8") for row in kept]


class _JointObjective:
    """The loss of one step: the NLL of a harmful group's refusals and the KL of a benign group
    to the model before the edit (its first answer positions weighted up)."""

    def __init__(
        self,
        runner: Runner,
        harmful: list[AnswerGroup],
        benign: list[AnswerGroup],
        own: list[AnswerGroup],
        shifts: list[WeightShift],
        params: DinmParams,
    ):
        self.runner, self.shifts, self.params = runner, shifts, params
        self.harmful, self.benign, self.own = harmful, benign, own
        device = runner.device
        # The runner holds the sequences harmful, then benign, then the instances' own groups.
        refusing = [*harmful, *own]
        self._refusal_reads: list[Read] = [
            (i if i < len(harmful) else len(benign) + i, g.keep, g.mask().to(device))
            for i, g in enumerate(refusing)
        ]
        self._benign_reads: list[Read] = [
            (len(harmful) + i, g.keep, g.mask().to(device)) for i, g in enumerate(benign)
        ]
        self._targets = [g.targets().to(device) for g in refusing]
        self._firsts = [_first_positions(g).to(device) for g in benign]

    def loss(self, step: int, own_group: int | None = None) -> torch.Tensor:
        """Step `step`'s loss; with `own_group`, that group of the instances' own rows takes the
        place of the step's harmful group."""
        h = step % len(self.harmful) if own_group is None else len(self.harmful) + own_group
        b = step % len(self.benign)
        with torch.no_grad(), shifts_disabled(self.shifts):
            (pre,) = self.runner.reads_logits([self._benign_reads[b]])
        pre = F.log_softmax(pre.float(), dim=-1)
        refusals, kept = self.runner.reads_logits([self._refusal_reads[h], self._benign_reads[b]])
        nll = F.cross_entropy(refusals.float(), self._targets[h])
        post = F.log_softmax(kept.float(), dim=-1)
        per_position = (pre.exp() * (pre - post)).sum(-1)
        kl = per_position.mean()
        kl = kl + self.params.benign_first_weight * per_position[self._firsts[b]].mean()
        return self.params.nll_weight * nll + self.params.benign_kl_weight * kl


def _first_positions(group: AnswerGroup) -> torch.Tensor:
    """Indices, among a group's read positions (rows after one another), of each row's first."""
    lengths = torch.tensor([end - start for start, end in group.spans])
    return torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]])


def _answering(
    lm: LoadedModel, instances: list[SafeEditInstance]
) -> Callable[[list[int]], list[int]]:
    """Which of the given instances the model, as it is now, still answers: greedy answers to
    the adversarial prompt and the bare question, either judged unsafe by the offline judge."""
    judge = OfflineJudge()

    def answering(indices: list[int]) -> list[int]:
        asked = [
            (i, prompt)
            for i in indices
            for prompt in (instances[i].adversarial_prompt, instances[i].question)
            if prompt
        ]
        prompts = [p for _, p in asked]
        answers = [g.text for g in generate(lm, prompts, max_new_tokens=ANSWER_CHECK_TOKENS)]
        verdicts = judge.judge(prompts, answers, harmful=True)
        return sorted({i for (i, _), v in zip(asked, verdicts, strict=True) if v.unsafe})

    return answering


def _tune(
    objective: _JointObjective,
    params: DinmParams,
    report: Progress,
    should_cancel: CancelCheck | None,
    answering: Callable[[list[int]], list[int]] | None,
) -> tuple[list[float], list[int]]:
    """The steps, then (with `instance_steps`) steps on the instances still answered; the
    losses and the instances still answered at the end."""
    optimizer = torch.optim.Adam(
        [p for shift in objective.shifts for p in shift.trainable()], lr=params.lr
    )
    most = params.steps + params.instance_steps  # progress: a share of the most steps there can be
    losses: list[float] = []

    def step(own_group: int | None = None) -> None:
        done = len(losses)
        if should_cancel is not None and should_cancel():
            raise EditCancelled(f"cancelled after {done} of at most {most} steps")
        loss = objective.loss(done, own_group)
        losses.append(loss.item())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        report("tune", (done + 1) / most)

    report("tune", 0.0)
    for _ in range(params.steps):
        step()
    answered = answering(list(range(len(objective.own)))) if answering else []
    for i in range(params.instance_steps):
        if not answered:
            break
        step(answered[i % len(answered)])
        answered = answering(answered)
    report("tune", 1.0)
    return losses, answered
