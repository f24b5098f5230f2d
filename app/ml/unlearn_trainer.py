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
from app.ml.models import LoadedModel
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
    def __init__(
        self,
        lm: LoadedModel,
        trainable: Trainable,
        forget: list[EncodedDocument],
        retain: list[EncodedDocument],
        method: str,
        params: UnlearnParams,
    ):
        self.lm, self.trainable, self.method, self.params = lm, trainable, method, params
        self.forget, self.retain = forget, retain
        self.pad = lm.tokenizer.pad_token_id or lm.tokenizer.eos_token_id or 0
        rng = random.Random(params.seed)
        self.forget_batches = cycle(forget, params.batch_size, rng)
        self.retain_batches = cycle(retain, params.batch_size, rng)
        self.needs_retain = method == "graddiff" or params.kl_weight > 0
        self.reference = self._reference_logprobs() if method == "npo" else {}
        self.tokens = 0  # tokens through forward and backward so far
        self.train_seconds = 0.0  # in the optimiser steps alone
        self.history: list[dict[str, float]] = []  # per step: the loss terms

    def run(self, report: Progress, should_cancel: CancelCheck | None) -> Outcome:
        params = self.params
        optimizer = torch.optim.AdamW(self.trainable.parameters, lr=params.lr, weight_decay=0.0)
        ppl_before, forget_before = self.retain_perplexity(), self.forget_nll()
        guard = _Guard(self, ppl_before)
        self.lm.model.train(False)  # dropout off: the gradient of a deterministic model
        report("unlearn", 0.0)
        stopped = self._train(optimizer, guard, report, should_cancel)
        forget_after = self.forget_nll()
        return Outcome(
            guard.kept, stopped, self.history, guard.checks, ppl_before, forget_before,
            forget_after, self.train_seconds, self.tokens,
        )  # fmt: skip

    def _train(
        self,
        optimizer: torch.optim.Optimizer,
        guard: _Guard,
        report: Progress,
        should_cancel: CancelCheck | None,
    ) -> str:
        """Optimiser steps until the last one, the guard or the forget target: which stopped it."""
        steps, stop_nll = self.params.steps, self.params.stop_forget_nll
        for step in range(1, steps + 1):
            if should_cancel is not None and should_cancel():
                raise EditCancelled(f"cancelled after {step - 1} of {steps} steps")
            began = time.perf_counter()
            self.history.append(self._step(optimizer))
            self.train_seconds += time.perf_counter() - began
            report("unlearn", step / steps)
            target_hit = stop_nll is not None and self.history[-1]["forget_nll"] >= stop_nll
            if step % self.params.check_every and step != steps and not target_hit:
                continue
            if not guard.check(step):
                return "perplexity_guard"
            if target_hit:
                return "forget_target"
        return "steps"

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
        loss = self._npo_loss(nll, batch, pieces) if self.method == "npo" else -forget_nll
        terms = {"forget_nll": forget_nll}
        if self.needs_retain:
            loss = self._with_retain(loss, terms)
        terms["loss"] = loss
        return terms

    def _npo_loss(
        self, nll: torch.Tensor, batch: Batch, pieces: list[EncodedDocument]
    ) -> torch.Tensor:
        """(2/beta) mean softplus(beta * log-ratio to the parent), summed over each piece."""
        logp = -_per_row(nll, batch)
        ref = torch.stack([self.reference[id(p)] for p in pieces]).to(logp)
        beta = self.params.npo_beta
        return (2 / beta) * F.softplus(beta * (logp - ref)).mean()

    def _with_retain(self, loss: torch.Tensor, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        """`loss` plus the terms on the next retain batch (graddiff's NLL, the KL), each also
        recorded in `terms`."""
        retain = collate(next(self.retain_batches), self.pad, self.lm.device)
        self.tokens += int(retain.attention.sum())
        if self.method == "graddiff":
            terms["retain_nll"] = self._target_nll(retain).mean()
            loss = loss + self.params.retain_weight * terms["retain_nll"]
        if self.params.kl_weight > 0:
            terms["retain_kl"] = self._retain_kl(retain)
            loss = loss + self.params.kl_weight * terms["retain_kl"]
        return loss

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


class _Guard:
    """The retain-perplexity bound: a check within it snapshots the trainable update, a check past
    it restores the last snapshot. `kept` is the step of that snapshot, `checks` every check."""

    def __init__(self, trainer: Trainer, ppl_before: float):
        increase = trainer.params.max_ppl_increase
        self.bound = math.inf if increase is None else ppl_before * (1 + increase)
        self.trainer, self.trainable = trainer, trainer.trainable
        self.saved, self.kept = self.trainable.snapshot(), 0
        self.checks: list[dict[str, float]] = [{"step": 0, "retain_ppl": ppl_before}]

    def check(self, step: int) -> bool:
        """Whether the state after `step` is within the bound (else it is undone)."""
        ppl = self.trainer.retain_perplexity()
        self.checks.append({"step": step, "retain_ppl": ppl})
        if ppl > self.bound:
            self.trainable.restore(self.saved)
            return False
        self.saved, self.kept = self.trainable.snapshot(), step
        return True


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
