"""Corpus unlearning's training loop: the methods' losses, the optimiser steps, the guard rails.

Each step runs `grad_accum` forget batches (and, for graddiff or a KL term, as many retain
batches) forward and backward, then one AdamW step. The output head runs only at the positions
whose next token a loss reads. Every `check_every` steps (and at the end) the retain perplexity is
checked against the parent's bound; past it, the last state within it is restored and training
stops. `stop_forget_nll` stops once the forget NLL reaches the target.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from app.ml.corpus import EncodedDocument
from app.ml.errors import EditCancelled
from app.ml.unlearn_data import Batch, collate, cycle
from app.ml.unlearn_params import UnlearnParams
from app.ml.unlearn_scope import Trainable

Progress = Callable[[str, float], None]
CancelCheck = Callable[[], bool]


@dataclass
class Outcome:
    kept_steps: int
    stopped: str
    history: list[dict[str, float]]
    checks: list[dict[str, float]]
    ppl_before: float
    forget_nll_before: float
    forget_nll_after: float
    train_seconds: float
    train_tokens: int


class Trainer:
    def __init__(self, lm, trainable: Trainable, forget, retain, method, params: UnlearnParams):
        self.lm, self.trainable, self.method, self.params = lm, trainable, method, params
        self.forget, self.retain = forget, retain
        self.pad = lm.tokenizer.pad_token_id or lm.tokenizer.eos_token_id or 0
        rng = random.Random(params.seed)
        self.forget_batches = cycle(forget, params.batch_size, rng)
        self.retain_batches = cycle(retain, params.batch_size, rng)
        self.needs_retain = method == "graddiff" or params.kl_weight > 0
        self.reference = self._reference_logprobs() if method == "npo" else {}
        self.tokens = 0  # tokens through forward and backward so far

    def run(self, report: Progress, should_cancel: CancelCheck | None) -> Outcome:
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
        return Outcome(
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
        batch = collate(pieces, self.pad, self.lm.device)
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
            retain = collate(next(self.retain_batches), self.pad, self.lm.device)
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

    def _target_logits(self, batch: Batch) -> torch.Tensor:
        """Logits [n, vocab] at the n positions that predict a target token, in row-major order.
        The output head (large with a big vocabulary) runs on those positions only."""
        predicts = F.pad(batch.targets, (0, 1))  # position t predicts the token at t + 1
        with _head_only_at(self.lm.adapter.head, predicts):
            out = self.lm.model(input_ids=batch.ids, attention_mask=batch.attention)
        return out.logits.float()

    def _target_nll(self, batch: Batch) -> torch.Tensor:
        """NLL [n] of each target token."""
        targets = batch.ids[:, 1:][batch.targets]
        return F.cross_entropy(self._target_logits(batch), targets, reduction="none")

    def _retain_kl(self, batch: Batch) -> torch.Tensor:
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
                batch = collate(pieces, self.pad, self.lm.device)
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
            batch = collate(pieces[i : i + self.params.batch_size], self.pad, self.lm.device)
            nll = self._target_nll(batch)
            total += nll.sum().item()
            count += nll.numel()
        return total / max(count, 1.0)


def _per_row(values: torch.Tensor, batch: Batch) -> torch.Tensor:
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
