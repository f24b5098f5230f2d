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
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from app.ml.corpus import Document, EncodedDocument, encode_document, with_spans
from app.ml.deltas import Delta, DenseUpdate, LowRankUpdate, Update, fingerprint
from app.ml.errors import EditCancelled, InputError
from app.ml.models import LoadedModel
from app.ml.unlearn_params import MLP_OUT, UnlearnParams
from app.ml.weight_shift import shifts_disabled, weight_shifts

Progress = Callable[[str, float], None]
CancelCheck = Callable[[], bool]
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


@dataclass
class _Batch:
    ids: torch.Tensor  # [B, T], right padded
    attention: torch.Tensor  # [B, T]
    targets: torch.Tensor  # [B, T-1] bool: positions whose next token counts


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
    forget_pieces, warnings = _forget_pieces(lm, forget, method, params)
    retain_pieces = _pieces(lm, retain, params.max_length, all_tokens=True)
    targets = _module_names(lm, params)
    torch.manual_seed(params.seed)  # LoRA's initialisation
    with _trainable(lm, targets, params) as handle:
        trainer = _Trainer(lm, handle, forget_pieces, retain_pieces, method, params)
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
        forget_tokens=sum(p.harmful[1:].count(True) for p in forget_pieces),
        warnings=warnings,
    )


# -- data -----------------------------------------------------------------------------------


def _forget_pieces(
    lm: LoadedModel, forget: Sequence[Document], method: str, params: UnlearnParams
) -> tuple[list[EncodedDocument], list[str]]:
    if not forget:
        raise InputError("forget: at least one document is needed")
    warnings = []
    if method in USES_SPANS:
        unmarked = sum(1 for d in forget if d.harmful_spans is None)
        forget = with_spans(forget, lexicon=params.lexicon, threshold=params.span_threshold)
        if unmarked:
            warnings.append(
                f"{unmarked} forget document(s) had no harmful_spans: their harmful words were "
                "marked automatically (classifier + lexicon)"
            )
    pieces = _pieces(lm, forget, params.max_length, all_tokens=method not in USES_SPANS)
    pieces = [p for p in pieces if any(p.harmful[1:])]
    if not pieces:
        raise InputError(
            "forget: no harmful token to unlearn: give harmful_spans, a params.lexicon, or use "
            "method 'ga' (every token)"
        )
    return pieces, warnings


def _pieces(
    lm: LoadedModel, documents: Sequence[Document], max_length: int, *, all_tokens: bool
) -> list[EncodedDocument]:
    length = min(max_length, lm.context_length)
    pieces = []
    for document in documents:
        for piece in encode_document(lm.tokenizer, document, max_length=length):
            if all_tokens:
                piece = EncodedDocument(piece.input_ids, [True] * len(piece.input_ids))
            pieces.append(piece)
    return pieces


def _collate(pieces: Sequence[EncodedDocument], pad_id: int, device: torch.device) -> _Batch:
    width = max(len(p.input_ids) for p in pieces)
    ids = torch.full((len(pieces), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(pieces), width), dtype=torch.long)
    targets = torch.zeros((len(pieces), width), dtype=torch.bool)
    for i, piece in enumerate(pieces):
        n = len(piece.input_ids)
        ids[i, :n] = torch.tensor(piece.input_ids)
        attention[i, :n] = 1
        targets[i, :n] = torch.tensor(piece.harmful)
    return _Batch(ids.to(device), attention.to(device), targets[:, 1:].to(device))


def _cycle(pieces: Sequence[EncodedDocument], size: int, rng: random.Random) -> Iterator[list]:
    """Batches of `size` pieces, reshuffled every pass."""
    while True:
        order = list(pieces)
        rng.shuffle(order)
        for i in range(0, len(order), size):
            yield order[i : i + size]


# -- what is trained ------------------------------------------------------------------------


def _module_names(lm: LoadedModel, params: UnlearnParams) -> list[str]:
    """Full names of the modules to tune: `params.modules` inside each of `params.layers`."""
    adapter = lm.adapter
    layers = params.layers if params.layers is not None else range(adapter.num_layers)
    prefix = adapter.spec.layers
    names: list[str] = []
    for layer in layers:
        adapter.check_layer(layer)
        inside = dict(adapter.layers[layer].named_modules())
        for wanted in params.modules:
            if wanted == MLP_OUT:
                names.append(adapter.mlp_out_param_name(layer).removesuffix(".weight"))
                continue
            found = [
                n
                for n, m in inside.items()
                if (n == wanted or n.endswith(f".{wanted}")) and isinstance(m, nn.Linear | Conv1D)
            ]
            if not found:
                raise InputError(
                    f"params.modules: layer {layer} has no linear module named {wanted!r} "
                    f"(its linear modules: {', '.join(_linear_names(inside)) or 'none'})"
                )
            names += [f"{prefix}.{layer}.{n}" for n in found]
    return list(dict.fromkeys(names))


def _linear_names(modules: dict[str, nn.Module]) -> list[str]:
    return [n for n, m in modules.items() if isinstance(m, nn.Linear | Conv1D)]


class _Trainable:
    """The trainable update of the chosen modules: its parameters, a way to switch it off (the
    parent model), a snapshot/restore for the guard, and the resulting deltas."""

    parameters: list[nn.Parameter]

    def disabled(self) -> AbstractContextManager[None]: ...
    def updates(self) -> dict[str, Update]: ...

    def snapshot(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.parameters]

    def restore(self, saved: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for param, value in zip(self.parameters, saved, strict=True):
                param.copy_(value)


@contextmanager
def _trainable(lm: LoadedModel, names: list[str], params: UnlearnParams) -> Iterator[_Trainable]:
    modules = dict(lm.model.named_modules())
    grads = {n: p.requires_grad for n, p in lm.model.named_parameters()}
    try:
        if params.scope == "dense":
            with weight_shifts([modules[n] for n in names]) as shifts:
                yield _DenseTrainable(lm, names, shifts)
        else:
            with _lora(lm, names, params) as lora:
                yield lora
    finally:
        for name, param in lm.model.named_parameters():
            param.requires_grad_(grads.get(name, param.requires_grad))


class _DenseTrainable(_Trainable):
    def __init__(self, lm: LoadedModel, names: list[str], shifts):
        self._lm, self._names, self._shifts = lm, names, shifts
        self.parameters = [s.delta for s in shifts]
        for param in lm.model.parameters():
            param.requires_grad_(False)
        for param in self.parameters:
            param.requires_grad_(True)

    def disabled(self) -> AbstractContextManager[None]:
        return shifts_disabled(self._shifts)

    def updates(self) -> dict[str, Update]:
        return {
            f"{name}.weight": DenseUpdate(shift.delta.detach().to(self._lm.dtype).clone())
            for name, shift in zip(self._names, self._shifts, strict=True)
        }


class _LoraTrainable(_Trainable):
    def __init__(self, lm: LoadedModel, peft_model, names: list[str]):
        self._lm, self._peft, self._names = lm, peft_model, names
        self.parameters = [p for p in peft_model.parameters() if p.requires_grad]

    def disabled(self) -> AbstractContextManager[None]:
        return self._peft.disable_adapter()

    def updates(self) -> dict[str, Update]:
        """Exact low-rank deltas in each parameter's own layout: W' = W + B·A·scale."""
        modules = dict(self._lm.model.named_modules())
        updates: dict[str, Update] = {}
        for name in self._names:
            layer = modules[name]
            a = layer.lora_A["default"].weight.detach().float()  # [r, in]
            b = layer.lora_B["default"].weight.detach().float() * layer.scaling["default"]
            if isinstance(layer.get_base_layer(), Conv1D):  # weight is [in, out]: transpose
                a, b = b.t().contiguous(), a.t().contiguous()
            dtype = self._lm.dtype
            updates[f"{name}.weight"] = LowRankUpdate(a=a.to(dtype), b=b.to(dtype))
        return updates


@contextmanager
def _lora(lm: LoadedModel, names: list[str], params: UnlearnParams) -> Iterator[_LoraTrainable]:
    from peft import LoraConfig, get_peft_model  # only LoRA runs need peft

    model = lm.model
    config = LoraConfig(
        r=params.lora_rank,
        lora_alpha=params.lora_alpha,
        lora_dropout=0.0,
        target_modules=names,
        fan_in_fan_out=isinstance(dict(model.named_modules())[names[0]], Conv1D),
    )
    peft_model = get_peft_model(model, config)
    try:
        yield _LoraTrainable(lm, peft_model, names)
    finally:
        peft_model.unload()  # the original modules back in place, not merged


# -- training -------------------------------------------------------------------------------


@dataclass
class _Outcome:
    kept_steps: int
    stopped: str
    history: list[dict[str, float]]
    checks: list[dict[str, float]]
    ppl_before: float
    forget_nll_before: float
    forget_nll_after: float
    train_seconds: float
    train_tokens: int


class _Trainer:
    def __init__(self, lm, trainable: _Trainable, forget, retain, method, params: UnlearnParams):
        self.lm, self.trainable, self.method, self.params = lm, trainable, method, params
        self.forget, self.retain = forget, retain
        self.pad = lm.tokenizer.pad_token_id or lm.tokenizer.eos_token_id or 0
        rng = random.Random(params.seed)
        self.forget_batches = _cycle(forget, params.batch_size, rng)
        self.retain_batches = _cycle(retain, params.batch_size, rng)
        self.needs_retain = method == "graddiff" or params.kl_weight > 0
        self.reference = self._reference_logprobs() if method == "npo" else {}
        self.tokens = 0  # tokens through forward and backward so far

    def run(self, report: Progress, should_cancel: CancelCheck | None) -> _Outcome:
        params = self.params
        optimizer = torch.optim.AdamW(self.trainable.parameters, lr=params.lr, weight_decay=0.0)
        ppl_before, forget_before = self.retain_perplexity(), self.forget_nll()
        bound = (
            math.inf
            if params.max_ppl_increase is None
            else ppl_before * (1 + params.max_ppl_increase)
        )
        saved, kept, stopped = self.trainable.snapshot(), 0, "steps"
        train_seconds = 0.0
        history: list[dict[str, float]] = []
        checks = [{"step": 0, "retain_ppl": ppl_before}]
        self.lm.model.train(False)  # dropout off: the gradient of a deterministic model
        report("unlearn", 0.0)
        for step in range(1, params.steps + 1):
            if should_cancel is not None and should_cancel():
                raise EditCancelled(f"cancelled after {step - 1} of {params.steps} steps")
            began = time.perf_counter()
            history.append(self._step(optimizer))
            train_seconds += time.perf_counter() - began
            report("unlearn", step / params.steps)
            target_hit = (
                params.stop_forget_nll is not None
                and history[-1]["forget_nll"] >= params.stop_forget_nll
            )
            if step % params.check_every and step != params.steps and not target_hit:
                continue
            ppl = self.retain_perplexity()
            checks.append({"step": step, "retain_ppl": ppl})
            if ppl > bound:
                self.trainable.restore(saved)
                stopped = "perplexity_guard"
                break
            saved, kept = self.trainable.snapshot(), step
            if target_hit:
                stopped = "forget_target"
                break
        forget_after = self.forget_nll()
        return _Outcome(
            kept, stopped, history, checks, ppl_before, forget_before, forget_after,
            train_seconds, self.tokens,
        )  # fmt: skip

    def _step(self, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        for _ in range(self.params.grad_accum):
            terms = self._loss_terms(next(self.forget_batches))
            (terms["loss"] / self.params.grad_accum).backward()
            for key, value in terms.items():
                totals[key] = totals.get(key, 0.0) + value.item() / self.params.grad_accum
        optimizer.step()
        return {key: round(value, 6) for key, value in totals.items()}

    def _loss_terms(self, pieces: list[EncodedDocument]) -> dict[str, torch.Tensor]:
        batch = _collate(pieces, self.pad, self.lm.device)
        self.tokens += int(batch.attention.sum())
        nll = self._target_nll(batch)
        forget_nll = nll.mean()
        if self.method == "npo":
            logp = -_per_row(nll, batch)
            ref = torch.stack([self.reference[id(p)] for p in pieces]).to(logp)
            loss = (2 / self.params.npo_beta) * F.softplus(
                self.params.npo_beta * (logp - ref)
            ).mean()
        else:
            loss = -forget_nll
        terms = {"forget_nll": forget_nll}
        if self.needs_retain:
            retain = _collate(next(self.retain_batches), self.pad, self.lm.device)
            self.tokens += int(retain.attention.sum())
            if self.method == "graddiff":
                retain_nll = self._target_nll(retain).mean()
                loss = loss + self.params.retain_weight * retain_nll
                terms["retain_nll"] = retain_nll
            if self.params.kl_weight > 0:
                kl = self._retain_kl(retain)
                loss = loss + self.params.kl_weight * kl
                terms["retain_kl"] = kl
        terms["loss"] = loss
        return terms

    def _target_logits(self, batch: _Batch) -> torch.Tensor:
        """Logits [n, vocab] at the n positions that predict a target token, in row-major order.
        The output head (large with a big vocabulary) runs on those positions only."""
        predicts = F.pad(batch.targets, (0, 1))  # position t predicts the token at t + 1
        with _head_only_at(self.lm.adapter.head, predicts):
            out = self.lm.model(input_ids=batch.ids, attention_mask=batch.attention)
        return out.logits.float()

    def _target_nll(self, batch: _Batch) -> torch.Tensor:
        """NLL [n] of each target token."""
        targets = batch.ids[:, 1:][batch.targets]
        return F.cross_entropy(self._target_logits(batch), targets, reduction="none")

    def _retain_kl(self, batch: _Batch) -> torch.Tensor:
        """KL(parent || edited) per retain token, averaged."""
        with torch.no_grad(), self.trainable.disabled():
            parent = F.log_softmax(self._target_logits(batch), dim=-1)
        edited = F.log_softmax(self._target_logits(batch), dim=-1)
        return (parent.exp() * (parent - edited)).sum(-1).mean()

    @torch.no_grad()
    def _reference_logprobs(self) -> dict[int, torch.Tensor]:
        """Each forget piece's log p_parent(harmful tokens), for NPO (the adapter starts at zero:
        computed with it switched off anyway, so this holds for any start)."""
        reference = {}
        with self.trainable.disabled():
            for i in range(0, len(self.forget), self.params.batch_size):
                pieces = self.forget[i : i + self.params.batch_size]
                batch = _collate(pieces, self.pad, self.lm.device)
                logp = -_per_row(self._target_nll(batch), batch)
                reference.update({id(p): v for p, v in zip(pieces, logp, strict=True)})
        return reference

    def retain_perplexity(self) -> float:
        return math.exp(self._mean_nll(self.retain))

    def forget_nll(self) -> float:
        """Mean NLL of every forget target token (the whole set, not one batch)."""
        return self._mean_nll(self.forget)

    @torch.no_grad()
    def _mean_nll(self, pieces: Sequence[EncodedDocument]) -> float:
        total = count = 0.0
        for i in range(0, len(pieces), self.params.batch_size):
            batch = _collate(pieces[i : i + self.params.batch_size], self.pad, self.lm.device)
            nll = self._target_nll(batch)
            total += nll.sum().item()
            count += nll.numel()
        return total / max(count, 1.0)


def _per_row(values: torch.Tensor, batch: _Batch) -> torch.Tensor:
    """Sums [B] per batch row of per-target values [n] (row-major, as `_target_logits`)."""
    rows = batch.targets.nonzero()[:, 0]
    return torch.zeros(batch.ids.shape[0], dtype=values.dtype, device=values.device).index_add(
        0, rows, values
    )


@contextmanager
def _head_only_at(head: nn.Module, where: torch.Tensor) -> Iterator[None]:
    """While inside, the output head sees only the positions `where` [B, T] selects, so the
    model's logits come out as [n, vocab]. Anything a family applies after its head (logit
    scaling, soft-capping) is element-wise and stays correct."""

    def select(_module: nn.Module, args: tuple) -> tuple:
        hidden = args[0]
        if hidden.shape[:2] != where.shape:
            raise RuntimeError(
                f"the output head got hidden states of shape {tuple(hidden.shape)}, expected "
                f"[batch, positions] = {tuple(where.shape)} first"
            )
        return (hidden[where], *args[1:])

    handle = head.register_forward_pre_hook(select)
    try:
        yield
    finally:
        handle.remove()
