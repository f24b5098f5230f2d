"""DINM: Detoxifying with Intraoperative Neural Monitoring (Wang et al. 2024, arXiv 2403.14472).

From ONE unsafe instance: locate the "toxic layer", the decoder layer whose hidden states differ
most between the safe and the unsafe response, then tune only that layer's MLP output projection
for a few steps with

    loss = nll_weight * NLL(safe response | adversarial prompt) + kl_weight * KL(pre || post)

where the KL runs over the answer tokens of the instance's knowledge-constraint prompt. Unlike the
reference implementation, the post-edit logits keep their graph, so the constraint really acts.

The tuned weight is parametrised as `W + D` with an fp32 trainable `D` that starts at zero: the
result is `D` itself (no subtraction), the base weights are restored bitwise afterwards, and bf16
models still accumulate updates in full precision.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from app.ml.deltas import Delta, DenseUpdate, fingerprint
from app.ml.errors import EditCancelled
from app.ml.models import LoadedModel
from app.ml.params import DinmParams
from app.ml.prompts import PromptAnswer, chat_text, encode_prompt_answer
from app.ml.runners import FastRunner, PlainRunner, Runner, run_layers
from app.ml.safeedit import SafeEditInstance

Progress = Callable[[str, float], None]
CancelCheck = Callable[[], bool]


@dataclass
class DinmResult:
    delta: Delta
    layer: int
    distances: list[float]
    losses: list[float]
    edit_seconds: float
    warnings: list[str] = field(default_factory=list)


def layer_distances(lm: LoadedModel, instance: SafeEditInstance) -> list[float]:
    """L2 distance between each decoder layer's hidden states for the safe and unsafe response.

    Each response is run alone, so there is no padding; the distance covers the positions both
    responses have (the reference implementation pads them together and counts pad positions).
    """
    states = [
        _layer_outputs(lm, text) for text in (instance.safe_generation, instance.unsafe_generation)
    ]
    common = min(states[0][0].shape[0], states[1][0].shape[0])
    return [
        torch.linalg.vector_norm((safe[:common] - unsafe[:common]).float()).item()
        for safe, unsafe in zip(*states, strict=True)
    ]


def locate_toxic_layer(lm: LoadedModel, instance: SafeEditInstance) -> tuple[int, list[float]]:
    """The layer with the largest distance (the lowest such layer on a tie), and all distances."""
    distances = layer_distances(lm, instance)
    return max(range(len(distances)), key=lambda i: (distances[i], -i)), distances


def _layer_outputs(lm: LoadedModel, text: str) -> list[torch.Tensor]:
    ids = lm.tokenizer(text, return_tensors="pt")["input_ids"][:, : lm.context_length]
    outputs: list[torch.Tensor] = []

    def keep(_module: nn.Module, _args: tuple, output: object) -> None:
        outputs.append((output[0] if isinstance(output, tuple) else output)[0].detach())

    hooks = [layer.register_forward_hook(keep) for layer in lm.adapter.layers]
    try:
        run_layers(lm.model, ids.to(lm.device))
    finally:
        for hook in hooks:
            hook.remove()
    return outputs


class _AddDelta(nn.Module):
    """Parametrisation weight -> weight + delta, with the delta kept in float32."""

    def __init__(self, like: torch.Tensor):
        super().__init__()
        self.delta = nn.Parameter(torch.zeros(like.shape, dtype=torch.float32, device=like.device))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta.to(weight.dtype)


class DinmObjective:
    """The two loss terms on fixed, pre-encoded sequences; the pre-edit KL target is kept."""

    def __init__(self, runner: Runner, nll_seq: PromptAnswer, kl_seq: PromptAnswer):
        self.runner = runner
        self.nll_seq, self.kl_seq = nll_seq, kl_seq
        with torch.no_grad():
            self.pre_logprobs = F.log_softmax(self._answer_logits(1).float(), dim=-1)

    def _answer_logits(self, index: int) -> torch.Tensor:
        """Logits at the positions that predict the answer tokens (the last one predicts
        nothing and is dropped)."""
        seq = (self.nll_seq, self.kl_seq)[index]
        return self.runner.logits(index, seq.answer_len + 1)[:-1]

    def terms(self) -> tuple[torch.Tensor, torch.Tensor]:
        targets = self.nll_seq.input_ids[0, self.nll_seq.answer_start :].to(
            self.pre_logprobs.device
        )
        nll = F.cross_entropy(self._answer_logits(0).float(), targets.to(self.runner.device))
        post = F.log_softmax(self._answer_logits(1).float(), dim=-1)
        pre = self.pre_logprobs
        kl = (pre.exp() * (pre - post)).sum(-1).mean()
        return nll, kl


def dinm_edit(
    lm: LoadedModel,
    instance: SafeEditInstance,
    params: DinmParams | None = None,
    *,
    progress: Progress | None = None,
    should_cancel: CancelCheck | None = None,
) -> DinmResult:
    """Run one DINM edit and return its delta; the model's weights are left as they were."""
    params = params or DinmParams()
    report = progress or (lambda _stage, _fraction: None)
    start = time.perf_counter()
    report("locate", 0.0)
    if params.layer is None:
        layer, distances = locate_toxic_layer(lm, instance)
    else:
        layer, distances = lm.adapter.check_layer(params.layer), []
    report("locate", 1.0)

    max_length = min(params.max_length, lm.context_length)
    nll_seq = encode_prompt_answer(
        lm.tokenizer,
        chat_text(lm.tokenizer, instance.adversarial_prompt, suffix=params.suffix()),
        instance.safe_generation,
        max_length=max_length,
        add_eos=True,
    )
    kc = instance.knowledge_constraint
    kl_seq = encode_prompt_answer(
        lm.tokenizer, chat_text(lm.tokenizer, kc.prompt), kc.answer, max_length=max_length
    )
    warnings = [
        f"{what} was {seq.truncated} tokens too long: its prompt was cut on the left"
        for what, seq in (("the adversarial prompt", nll_seq), ("the knowledge constraint", kl_seq))
        if seq.truncated
    ]

    name = lm.adapter.mlp_out_param_name(layer)
    base_fingerprint = fingerprint(lm.model, [name])
    module = lm.adapter.mlp_out(layer)
    shift = _AddDelta(module.weight)
    parametrize.register_parametrization(module, "weight", shift, unsafe=True)
    try:
        losses = _tune(lm, layer, params, nll_seq, kl_seq, shift, report, should_cancel)
    finally:
        # Drops the parametrisation and puts the untouched original tensor back in place.
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
    value = shift.delta.detach().to(lm.dtype)
    delta = Delta(
        {name: DenseUpdate(value)}, base_fingerprint, {"model": lm.name, "method": "dinm"}
    )
    return DinmResult(delta, layer, distances, losses, time.perf_counter() - start, warnings)


def _tune(
    lm: LoadedModel,
    layer: int,
    params: DinmParams,
    nll_seq: PromptAnswer,
    kl_seq: PromptAnswer,
    shift: _AddDelta,
    report: Progress,
    should_cancel: CancelCheck | None,
) -> list[float]:
    runner_cls = FastRunner if params.fast_path else PlainRunner
    runner = runner_cls(lm, layer, [nll_seq.input_ids, kl_seq.input_ids])
    objective = DinmObjective(runner, nll_seq, kl_seq)
    optimizer = torch.optim.Adam([shift.delta], lr=params.lr)
    losses: list[float] = []
    report("tune", 0.0)
    for step in range(params.steps):
        if should_cancel is not None and should_cancel():
            raise EditCancelled(f"cancelled after {step} of {params.steps} steps")
        nll, kl = objective.terms()
        loss = params.nll_weight * nll + params.kl_weight * kl
        losses.append(loss.item())
        if losses[-1] < params.stop_loss:
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        report("tune", (step + 1) / params.steps)
    report("tune", 1.0)
    return losses
