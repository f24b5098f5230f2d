"""The DINM loss on fixed, pre-encoded sequences, with the terms beyond the paper.

    loss = nll_weight * mean NLL(safe response | adversarial prompt [, bare question])
         + kl_weight * KL(pre || post) on the knowledge-constraint answer
         + benign_kl_weight * KL(pre || post) on answers of a benign retain group
         + harmful_nll_weight * NLL(refusals | a group of other harmful requests)

Both retain sets are project-owned and disjoint from every evaluation input (the SafeEdit cases
and `tests/data/`). The benign one (`app/ml/data/benign_retain.json`) holds everyday requests,
some with alarming words ("kill a tmux session"), each with a short answer; the harmful one
(`app/ml/data/harmful_retain.json`) holds harmful requests from every SafeEdit category, each with
a short refusal: the contrast that tells the edit what to refuse, not only what to keep. Each set
is shuffled once with a fixed seed and cut into groups; step `s` uses group `s mod groups`. A group
is one right-padded batch: with causal attention no real token sees the padding after it, so no
mask is needed and every row's logits are those of the row alone. Only the first
`GROUP_ANSWER_TOKENS` answer positions count: a refusal shows in the first tokens of an answer.

All pre-edit distributions are taken once, before the first update.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from functools import cache
from importlib import resources

import torch
import torch.nn.functional as F

from app.ml.prompts import PromptAnswer
from app.ml.runners import Runner

GROUP_ANSWER_TOKENS = 8
GROUP_SEED = 0


@cache
def _retain_set(name: str) -> tuple[tuple[str, str], ...]:
    text = resources.files("app.ml").joinpath(f"data/{name}").read_text("utf-8")
    return tuple((item["prompt"], item["answer"]) for item in json.loads(text))


def benign_retain_set() -> tuple[tuple[str, str], ...]:
    """The packaged benign retain set as (prompt, answer) pairs."""
    return _retain_set("benign_retain.json")


def harmful_retain_set() -> tuple[tuple[str, str], ...]:
    """The packaged harmful requests with their refusals, as (prompt, answer) pairs."""
    return _retain_set("harmful_retain.json")


@dataclass
class AnswerGroup:
    """Right-padded prompt+answer rows and, per row, the answer span that is constrained."""

    input_ids: torch.Tensor  # [B, L]
    spans: list[tuple[int, int]]  # [start, end) of the constrained answer tokens per row

    @property
    def keep(self) -> int:
        """Trailing positions whose logits the KL reads (from the first predicting position)."""
        return self.input_ids.shape[1] - (min(start for start, _ in self.spans) - 1)

    def mask(self) -> torch.Tensor:
        """[B, keep] True at the positions that predict a constrained answer token."""
        length, keep = self.input_ids.shape[1], self.keep
        mask = torch.zeros(len(self.spans), keep, dtype=torch.bool)
        for row, (start, end) in enumerate(self.spans):
            mask[row, start - 1 - (length - keep) : end - 1 - (length - keep)] = True
        return mask

    def targets(self) -> torch.Tensor:
        """[n] the answer tokens that the positions of `mask()` predict, row by row."""
        return torch.cat(
            [self.input_ids[row, start:end] for row, (start, end) in enumerate(self.spans)]
        )


def answer_groups(
    pairs: list[PromptAnswer], size: int, count: int, pad_id: int
) -> list[AnswerGroup]:
    """The first `count` groups of `size` encoded pairs, shuffled once with a fixed seed. Each row
    is cut after its constrained answer tokens: nothing later is read."""
    order = list(range(len(pairs)))
    random.Random(GROUP_SEED).shuffle(order)
    chunks = [order[i : i + size] for i in range(0, len(order), size)][:count]
    groups = []
    for chunk in chunks:
        rows = [pairs[i] for i in chunk]
        spans = []
        for pair in rows:
            start = max(pair.answer_start, 1)
            spans.append((start, min(pair.input_ids.shape[1], start + GROUP_ANSWER_TOKENS)))
        ids = torch.full((len(rows), max(end for _, end in spans)), pad_id, dtype=torch.long)
        for r, (pair, (_, end)) in enumerate(zip(rows, spans, strict=True)):
            ids[r, :end] = pair.input_ids[0, :end]
        groups.append(AnswerGroup(ids, spans))
    return groups


class DinmObjective:
    """The loss terms. The runner's sequences are, in order: the adversarial NLL sequence, the
    knowledge-constraint sequence, the extra NLL sequences, the benign groups, then the harmful
    groups."""

    def __init__(
        self,
        runner: Runner,
        nll_seq: PromptAnswer,
        kl_seq: PromptAnswer,
        *,
        extra_nll: list[PromptAnswer] | None = None,
        benign: list[AnswerGroup] | None = None,
        harmful: list[AnswerGroup] | None = None,
    ):
        self.runner = runner
        self.nll_seqs = [nll_seq, *(extra_nll or [])]
        self._nll_index = [0, *range(2, 2 + len(self.nll_seqs) - 1)]
        self.kl_seq = kl_seq
        self.benign = benign or []
        self.harmful = harmful or []
        self._benign_base = 1 + len(self.nll_seqs)
        self._harmful_base = self._benign_base + len(self.benign)
        self._masks = [group.mask().to(runner.device) for group in self.benign]
        self._harmful_masks = [group.mask().to(runner.device) for group in self.harmful]
        self._harmful_targets = [group.targets().to(runner.device) for group in self.harmful]
        with torch.no_grad():
            self.pre_logprobs = F.log_softmax(self._answer_logits(1, kl_seq).float(), dim=-1)
            self.benign_pre = [
                F.log_softmax(self._benign_logits(i).float(), dim=-1)
                for i in range(len(self.benign))
            ]

    def _answer_logits(self, index: int, seq: PromptAnswer) -> torch.Tensor:
        """Logits at the positions that predict the answer tokens (the last one predicts
        nothing and is dropped)."""
        return self.runner.logits(index, seq.answer_len + 1)[:-1]

    def _benign_logits(self, group: int) -> torch.Tensor:
        index, keep = self._benign_base + group, self.benign[group].keep
        return self.runner.rows_logits(index, keep, self._masks[group])

    def nll_terms(self) -> list[torch.Tensor]:
        """NLL of the safe response after each prompt it is trained on."""
        return self.nll_and_match()[0]

    def nll_and_match(self) -> tuple[list[torch.Tensor], list[int]]:
        """The NLL terms and, per trained sequence, how many leading safe-response tokens are
        each the most likely token given the ones before (what greedy decoding would follow)."""
        nlls, matched = [], []
        for index, seq in zip(self._nll_index, self.nll_seqs, strict=True):
            targets = seq.input_ids[0, seq.answer_start :].to(self.runner.device)
            logits = self._answer_logits(index, seq).float()
            nlls.append(F.cross_entropy(logits, targets))
            matched.append(_leading_matches(logits, targets))
        return nlls, matched

    def terms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The paper's two terms: NLL on the adversarial prompt and the knowledge-constraint KL."""
        return self.nll_terms()[0], self.knowledge_kl()

    def knowledge_kl(self) -> torch.Tensor:
        post = F.log_softmax(self._answer_logits(1, self.kl_seq).float(), dim=-1)
        return _kl(self.pre_logprobs, post)

    def benign_kl(self, step: int) -> torch.Tensor:
        """KL(pre || post) over the constrained answer positions of this step's benign group."""
        group = step % len(self.benign)
        post = F.log_softmax(self._benign_logits(group).float(), dim=-1)
        return _kl(self.benign_pre[group], post)

    def harmful_nll(self, step: int) -> torch.Tensor:
        """NLL of the refusals over the answer positions of this step's harmful group."""
        return self.harmful_nll_and_match(step)[0]

    def harmful_nll_and_match(self, step: int) -> tuple[torch.Tensor, int]:
        """The harmful NLL and the fewest leading refusal tokens that greedy decoding would
        follow, over the rows of this step's group."""
        group = step % len(self.harmful)
        index, keep = self._harmful_base + group, self.harmful[group].keep
        logits = self.runner.rows_logits(index, keep, self._harmful_masks[group]).float()
        targets = self._harmful_targets[group]
        lengths = [end - start for start, end in self.harmful[group].spans]
        rows = zip(logits.split(lengths), targets.split(lengths), strict=True)
        matched = min(_leading_matches(row_logits, row_targets) for row_logits, row_targets in rows)
        return F.cross_entropy(logits, targets), matched


def _leading_matches(logits: torch.Tensor, targets: torch.Tensor) -> int:
    """How many leading targets are each the most likely token: what greedy decoding follows."""
    hits = (logits.detach().argmax(-1) == targets).long()
    return int(hits.cumprod(0).sum().item())


def _kl(pre: torch.Tensor, post: torch.Tensor) -> torch.Tensor:
    return (pre.exp() * (pre - post)).sum(-1).mean()
