"""Corpus unlearning: gradient ascent on the harmful part of a corpus, with retain regularisation.

After "Towards Transfer Unlearning" (Lu et al. 2024, arXiv 2407.16951): their "masked language
modeling unlearning" ascends the loss of the harmful spans only, so the model forgets what is
harmful in a text rather than the text's language. On a causal LM the spans' tokens are the
prediction targets whose loss is ascended (their context is the whole preceding text). The methods
and their losses (`app.ml.unlearn_params` lists the knobs):

    masked_ga   -NLL(harmful tokens)
    ga          -NLL(every token of the forget documents)
    graddiff    -NLL(harmful tokens) + retain_weight * NLL(retain text)
    npo         (2/beta) * mean_docs softplus(beta * (log p(harmful) - log p_parent(harmful)))
    any method  + kl_weight * KL(parent || edited) on the retain text, when kl_weight > 0

NPO follows Zhang et al. 2024 (the loss -(2/beta) log sigmoid(-beta * log-ratio), written as a
softplus), with the log-ratio summed over each document's harmful tokens.

Scope: LoRA through `peft` on the chosen modules and layers (default; the result is stored as an
exact low-rank delta, B·A·scale) or dense float32 updates (see `weight_shift`). Either way the base
weights are never written and are restored exactly afterwards.

Guard rails: every `check_every` steps (and at the end) the retain perplexity is measured; once it
exceeds the parent's by more than `max_ppl_increase`, training stops and the result is the last
checked state that was within the bound (possibly the empty edit). `stop_forget_nll` stops once the
forget NLL reaches the target. Documents are shuffled with `seed`, and LoRA's initialisation is
seeded too, so a seed gives the same result on the same machine.

This module is the entry point, `unlearn`; the parts live beside it: `unlearn_data` (forget and
retain documents encoded into pieces, collated and cycled in batches), `unlearn_scope` (which
modules are trained, and their dense or LoRA update), `unlearn_trainer` (the training loop: the
methods' losses, the optimiser steps, the guard rails).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from app.ml.corpus import Document
from app.ml.deltas import Delta, fingerprint
from app.ml.errors import InputError
from app.ml.models import LoadedModel
from app.ml.unlearn_data import forget_pieces, pieces
from app.ml.unlearn_params import UnlearnParams
from app.ml.unlearn_scope import module_names, trainable
from app.ml.unlearn_trainer import CancelCheck, Progress, Trainer

USES_SPANS = ("masked_ga", "graddiff", "npo")


@dataclass
class UnlearnResult:
    delta: Delta
    method: str
    steps: int  # optimiser steps whose result is kept
    stopped: str  # "steps" | "perplexity_guard" | "forget_target"
    history: list[dict[str, float]]  # per step: loss, forget_nll (and retain_nll when used)
    checks: list[dict[str, float]]  # per guard check: step, retain_ppl
    retain_ppl_before: float
    forget_nll_before: float  # mean NLL of the forget set's target tokens, before and after
    forget_nll_after: float
    edit_seconds: float
    train_seconds: float  # the optimiser steps alone (no guard checks, no preparation)
    train_tokens: int  # tokens run forward and backward by those steps
    forget_tokens: int  # tokens whose loss is ascended
    warnings: list[str] = field(default_factory=list)


def unlearn(
    lm: LoadedModel,
    forget: Sequence[Document],
    retain: Sequence[Document],
    method: str = "masked_ga",
    params: UnlearnParams | None = None,
    *,
    progress: Progress | None = None,
    should_cancel: CancelCheck | None = None,
) -> UnlearnResult:
    """Unlearn `forget` (keeping `retain`) and return the delta; the model is left as it was."""
    params = params or UnlearnParams()
    report = progress or (lambda _stage, _fraction: None)
    start = time.perf_counter()
    if not retain:
        raise InputError("retain: at least one retain document is needed (perplexity guard)")
    report("prepare", 0.0)
    forget_set, warnings = forget_pieces(lm, forget, params, spans=method in USES_SPANS)
    retain_set = pieces(lm, retain, params.max_length, all_tokens=True)
    targets = module_names(lm, params)
    torch.manual_seed(params.seed)  # LoRA's initialisation
    with trainable(lm, targets, params) as handle:
        trainer = Trainer(lm, handle, forget_set, retain_set, method, params)
        outcome = trainer.run(report, should_cancel)
        delta_updates = handle.updates()
    base_fp = fingerprint(lm.model, list(delta_updates))
    meta = {"model": lm.name, "method": f"unlearn:{method}", "scope": params.scope}
    return UnlearnResult(
        delta=Delta(delta_updates, base_fp, meta),
        method=method,
        steps=outcome.kept_steps,
        stopped=outcome.stopped,
        history=outcome.history,
        checks=outcome.checks,
        retain_ppl_before=outcome.ppl_before,
        forget_nll_before=outcome.forget_nll_before,
        forget_nll_after=outcome.forget_nll_after,
        train_seconds=outcome.train_seconds,
        train_tokens=outcome.train_tokens,
        edit_seconds=time.perf_counter() - start,
        forget_tokens=sum(p.harmful[1:].count(True) for p in forget_set),
        warnings=warnings,
    )
