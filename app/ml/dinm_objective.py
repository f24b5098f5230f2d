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

All pre-edit distributions are taken once, before the first update (or given).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from functools import cache
from importlib import resources

import torch
import torch.nn.functional as F

from app.ml.prompts import PromptAnswer, right_padded
from app.ml.runners import Read, Runner

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


@cache
def _prompts(name: str) -> tuple[str, ...]:
    text = resources.files("app.ml").joinpath(f"data/{name}").read_text("utf-8")
    return tuple(item["prompt"] for item in json.loads(text))


def harmful_general_set() -> tuple[tuple[str, str], ...]:
    """The broad set of harmful requests (eleven categories) with refusals that end, as (prompt,
    answer) pairs: what a joint edit teaches the model to refuse besides its instances."""
    return _retain_set("harmful_general.json")


def benign_general_prompts() -> tuple[str, ...]:
    """The broad set of everyday requests, many of which only sound harmful: what a joint edit
    must keep answering as the model did."""
    return _prompts("benign_general.json")


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
    pairs: list[PromptAnswer],
    size: int,
    count: int | None,
    pad_id: int,
    *,
    answer_tokens: int | None = GROUP_ANSWER_TOKENS,
) -> list[AnswerGroup]:
    """The first `count` (None: all) groups of `size` encoded pairs, shuffled once with a fixed
    seed. Only the first `answer_tokens` answer tokens of a row are constrained (None: all of
    them), and each row is cut after them: nothing later is read."""
    order = list(range(len(pairs)))
    random.Random(GROUP_SEED).shuffle(order)
    chunks = [order[i : i + size] for i in range(0, len(order), size)][:count]
    groups = []
    for chunk in chunks:
        rows = [pairs[i] for i in chunk]
        spans = []
        for pair in rows:
            start = max(pair.answer_start, 1)
            end = pair.input_ids.shape[1]
            spans.append((start, end if answer_tokens is None else min(end, start + answer_tokens)))
        cut = [pair.input_ids[0, :end] for pair, (_, end) in zip(rows, spans, strict=True)]
        groups.append(AnswerGroup(right_padded(cut, pad_id), spans))
    return groups


@dataclass
class StepTerms:
    """One step's loss terms, with gradients to the tuned weight (None where a term is off), and
    how far greedy decoding would follow the trained answers."""

    nlls: list[torch.Tensor]  # NLL of the safe response after each prompt it is trained on
    matched: list[int]  # per trained prompt, leading safe-response tokens greedy decoding follows
    knowledge_kl: torch.Tensor  # KL(pre || post) on the knowledge-constraint answer
    benign_kl: torch.Tensor | None = None  # KL(pre || post) on this step's benign group
    harmful_nll: torch.Tensor | None = None  # NLL of the refusals of this step's harmful group
    harmful_matched: int | None = None  # the fewest leading refusal tokens followed, over rows


class DinmObjective:
    """The loss terms. The runner's sequences are, in order: the adversarial NLL sequence, the
    knowledge-constraint sequence, the extra NLL sequences, the benign groups, then the harmful
    groups. A step reads all its terms' positions through the output head at once."""

    def __init__(
        self,
        runner: Runner,
        nll_seq: PromptAnswer,
        kl_seq: PromptAnswer,
        *,
        extra_nll: list[PromptAnswer] | None = None,
        benign: list[AnswerGroup] | None = None,
        harmful: list[AnswerGroup] | None = None,
        benign_pre: list[torch.Tensor | None] | None = None,
    ):
        self.runner = runner
        self.nll_seqs = [nll_seq, *(extra_nll or [])]
        self.kl_seq = kl_seq
        self.benign = benign or []
        self.harmful = harmful or []
        nll_index = [0, *range(2, 1 + len(self.nll_seqs))]  # the knowledge constraint is 1
        self._nll_reads = [
            self._answer_read(i, seq) for i, seq in zip(nll_index, self.nll_seqs, strict=True)
        ]
        self._nll_targets = [
            seq.input_ids[0, seq.answer_start :].to(runner.device) for seq in self.nll_seqs
        ]
        self._kl_read = self._answer_read(1, kl_seq)
        first_benign = 1 + len(self.nll_seqs)
        self._benign_reads = [
            self._group_read(first_benign + i, group) for i, group in enumerate(self.benign)
        ]
        first_harmful = first_benign + len(self.benign)
        self._harmful_reads = [
            self._group_read(first_harmful + i, group) for i, group in enumerate(self.harmful)
        ]
        self._harmful_targets = [group.targets().to(runner.device) for group in self.harmful]
        self.pre_logprobs = self._logprobs(self._kl_read)
        # The pre-edit distributions depend only on the weights: a caller may keep them from an
        # earlier edit and pass them (None where it has none).
        given = benign_pre or [None] * len(self.benign)
        self.benign_pre = [
            pre if pre is not None else self._logprobs(read)
            for read, pre in zip(self._benign_reads, given, strict=True)
        ]

    def _answer_read(self, index: int, seq: PromptAnswer) -> Read:
        """The positions that predict the answer tokens (the last position predicts nothing)."""
        mask = torch.ones(1, seq.answer_len + 1, dtype=torch.bool)
        mask[0, -1] = False
        return index, seq.answer_len + 1, mask.to(self.runner.device)

    def _group_read(self, index: int, group: AnswerGroup) -> Read:
        return index, group.keep, group.mask().to(self.runner.device)

    @torch.no_grad()
    def _logprobs(self, read: Read) -> torch.Tensor:
        (logits,) = self.runner.reads_logits([read])
        return F.log_softmax(logits.float(), dim=-1)

    def step(self, step: int) -> StepTerms:
        """Every term of step `step` (which picks the benign and harmful groups in turn)."""
        reads = [*self._nll_reads, self._kl_read]
        benign = step % len(self.benign) if self.benign else None
        harmful = step % len(self.harmful) if self.harmful else None
        if benign is not None:
            reads.append(self._benign_reads[benign])
        if harmful is not None:
            reads.append(self._harmful_reads[harmful])
        logits = [part.float() for part in self.runner.reads_logits(reads)]
        count = len(self.nll_seqs)
        answers = list(zip(logits[:count], self._nll_targets, strict=True))
        nlls = [F.cross_entropy(x, targets) for x, targets in answers]
        matched = [_leading_matches(x, targets) for x, targets in answers]
        knowledge_kl = _kl(self.pre_logprobs, F.log_softmax(logits[count], dim=-1))
        terms = StepTerms(nlls, matched, knowledge_kl)
        rest = iter(logits[count + 1 :])
        if benign is not None:
            post = F.log_softmax(next(rest), dim=-1)
            terms.benign_kl = _kl(self.benign_pre[benign], post)
        if harmful is not None:
            terms.harmful_nll, terms.harmful_matched = self._harmful(harmful, next(rest))
        return terms

    def _harmful(self, group: int, logits: torch.Tensor) -> tuple[torch.Tensor, int]:
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
