"""Requests decoded together with a KV cache, each row with its own version.

A `Prefill` runs new requests' prompts, LEFT padded into one batch, through the model (a chunk of
columns at a time when asked); it becomes a `Cohort`: rows decoded a token per `step`. Position
ids follow the attention mask, so a padded row gives the tokens it would give alone; that is also
why a cohort can `absorb` another one (the narrower cache padded on the left) and rows can join
a running batch. After every step, rows that finished (end token, `max_tokens`, a stop string) or
whose client went away leave the cohort and its KV cache, freeing their slot. Each row samples
with its own parameters and its own random generator (`seed`). `run_batch` is the static policy
(one prefill, steps until every row is done); `batcher.ContinuousBatcher` interleaves them.
"""

from __future__ import annotations

import inspect
import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from app.ml.models import LoadedModel
from app.serving.decode_step import DecodeStep, model_step
from app.serving.sampling import (
    Event,
    Failed,
    Finished,
    SamplingParams,
    TextDelta,
    TokenLogprob,
)
from app.serving.weights import BatchDeltaHooks, VersionWeights

log = logging.getLogger(__name__)


@dataclass
class GenRequest:
    prompt_ids: list[int]
    weights: VersionWeights | None
    params: SamplingParams
    on_event: Callable[[Event], None]
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class _Row:
    request: GenRequest
    generator: torch.Generator
    tokens: list[int] = field(default_factory=list)  # new tokens, end token excluded
    generated: int = 0  # new tokens, end token included
    end: tuple[int, ...] = ()  # the end token, once one stopped the row
    emitted: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token in `tokens`
    logprobs_sent: int = 0  # how many of `logprobs` went out with a TextDelta

    def fresh_logprobs(self) -> tuple[TokenLogprob, ...]:
        """The log-probabilities of the text tokens not sent yet (the end token's left out)."""
        fresh = tuple(self.logprobs[self.logprobs_sent : len(self.tokens)])
        self.logprobs_sent += len(fresh)
        return fresh

    def emit(self, event: Event) -> None:
        try:
            self.request.on_event(event)
        except Exception:  # a consumer that went away must not stop the batch
            log.debug("dropping an event of a finished consumer", exc_info=True)


@dataclass
class Decoder:
    """What decoding needs beside the requests: the model, its delta hooks, its end tokens, and
    a lean decoding step where the model has one (`decode_step`; None: the model's forward)."""

    lm: LoadedModel
    hooks: BatchDeltaHooks
    stop_ids: set[int]
    pad_id: int
    step: DecodeStep | None = None

    @cached_property
    def last_logits_only(self) -> dict[str, int]:
        """Prefill needs the logits of the last position only (the output head over every
        prompt position would cost as much as several decoding steps)."""
        forward = inspect.signature(self.lm.model.forward).parameters
        return {"logits_to_keep": 1} if "logits_to_keep" in forward else {}


class Prefill:
    """New requests' prompts, left padded into one batch and run through the model a chunk of
    columns at a time (`run`), so a long prompt can share the compute thread with running rows;
    once every column ran, `cohort()` takes each row's first token."""

    def __init__(self, decoder: Decoder, requests: Sequence[GenRequest]):
        self.decoder = decoder
        device = decoder.lm.device
        self.rows = [_Row(r, _generator(r.params.seed, device)) for r in requests]
        width = max(len(r.prompt_ids) for r in requests)
        ids = torch.full((len(requests), width), decoder.pad_id, dtype=torch.long)
        mask = torch.zeros((len(requests), width), dtype=torch.long)
        for i, request in enumerate(requests):
            n = len(request.prompt_ids)
            ids[i, width - n :] = torch.tensor(request.prompt_ids, dtype=torch.long)
            mask[i, width - n :] = 1
        self.ids, self.mask = ids.to(device), mask.to(device)
        self.positions = (self.mask.cumsum(-1) - 1).clamp(min=0)
        self.cache = DynamicCache()
        self.plan = decoder.hooks.plan([r.weights for r in requests])
        self.done_columns = 0
        self.logits: torch.Tensor | None = None

    @property
    def done(self) -> bool:
        return self.done_columns == self.ids.shape[1]

    @torch.inference_mode()
    def run(self, max_tokens: int | None = None) -> None:
        """Run the next columns: as many as keep rows × columns within `max_tokens` (at least
        one), or all of them."""
        rows, width = self.ids.shape
        columns = width if max_tokens is None else max(1, max_tokens // rows)
        start, end = self.done_columns, min(width, self.done_columns + columns)
        lm = self.decoder.lm
        with self.decoder.hooks.using(self.plan):
            out = lm.model(
                input_ids=self.ids[:, start:end],
                attention_mask=self.mask[:, :end],
                position_ids=self.positions[:, start:end],
                past_key_values=self.cache,
                use_cache=True,
                **self.decoder.last_logits_only,
            )
        self.done_columns = end
        if self.done:
            self.logits = out.logits[:, -1, :].float()

    def fail(self, exc: BaseException) -> None:
        for row in self.rows:
            row.emit(Failed(exc))

    def cohort(self) -> tuple[Cohort, int]:
        """The rows as a decoding cohort, their first tokens taken (rows already done left it);
        and how many rows left because their client went away."""
        assert self.logits is not None, "the prefill has columns left to run"
        cohort = Cohort(self.decoder, self.rows, self.cache, self.mask, self.positions[:, -1:])
        return cohort, cohort.take(self.logits)


class Cohort:
    """Rows decoded together: one KV cache (rows left padded to a common width), its attention
    mask, each row's last position and its token chosen but not yet run through the model."""

    def __init__(
        self,
        decoder: Decoder,
        rows: list[_Row],
        cache: DynamicCache,
        mask: torch.Tensor,
        positions: torch.Tensor,
    ):
        self.decoder = decoder
        self.rows = rows
        self.cache = cache
        self.mask = mask
        self.positions = positions  # [rows, 1]
        self.pending: list[int] = []
        self._replan()

    def __len__(self) -> int:
        return len(self.rows)

    @torch.inference_mode()
    def step(self) -> int:
        """Run the pending tokens, take the next ones; how many rows left because their client
        went away."""
        device = self.decoder.lm.device
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)
        self.positions = self.positions + 1
        ids = torch.tensor(self.pending, device=device).unsqueeze(1)
        step = self.decoder.step or model_step(self.decoder.lm.model)
        with self.decoder.hooks.using(self.plan):
            logits = step(ids, self.mask, self.positions, self.cache)
        return self.take(logits[:, -1, :].float())

    def take(self, logits: torch.Tensor) -> int:
        """Choose each row's next token from `logits` [rows, vocab], send its events, and drop
        the rows that are done."""
        rows = self.rows
        chosen = [_choose(logits[i], row) for i, row in enumerate(rows)]
        for i, row in enumerate(rows):
            if row.request.params.logprobs is not None:
                row.logprobs.append(_logprob(logits[i], chosen[i], row.request.params.logprobs))
        cancelled = sum(1 for row in rows if row.request.cancelled.is_set())
        lm, stop_ids = self.decoder.lm, self.decoder.stop_ids
        keep = [i for i, row in enumerate(rows) if _advance(lm, row, chosen[i], stop_ids)]
        self.pending = [chosen[i] for i in keep]
        if len(keep) < len(rows):
            self._keep(keep)
        return cancelled

    def fail(self, exc: BaseException) -> None:
        for row in self.rows:
            row.emit(Failed(exc))
        self.rows = []

    def absorb(self, other: Cohort) -> bool:
        """Take `other`'s rows into this cohort, padding the narrower cache on the left; False
        (nothing changed) when the model's cache is not one this can pad (sliding windows,
        recurrent state)."""
        mine, theirs = _plain_layers(self.cache), _plain_layers(other.cache)
        if mine is None or theirs is None or len(mine) != len(theirs):
            return False
        width = max(self.mask.shape[1], other.mask.shape[1])
        for a, b in zip(mine, theirs, strict=True):
            a.keys = torch.cat([_pad_left(a.keys, width, -2), _pad_left(b.keys, width, -2)])
            a.values = torch.cat([_pad_left(a.values, width, -2), _pad_left(b.values, width, -2)])
        self.mask = torch.cat([_pad_left(self.mask, width, 1), _pad_left(other.mask, width, 1)])
        self.positions = torch.cat([self.positions, other.positions])
        self.rows += other.rows
        self.pending += other.pending
        self._replan()
        return True

    def _keep(self, keep: list[int]) -> None:
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            return
        index = torch.tensor(keep, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mask, self.positions = self.mask[index], self.positions[index]
        self._trim()
        self._replan()

    def _replan(self) -> None:
        """Which version each row runs, for the hooks (after the rows changed)."""
        self.plan = self.decoder.hooks.plan([row.request.weights for row in self.rows])

    def _trim(self) -> None:
        """Drop the leading columns no row attends to (left by rows that left)."""
        layers = _plain_layers(self.cache)
        if layers is None:
            return
        used = self.mask.any(dim=0).nonzero()
        first = int(used[0]) if len(used) else 0
        if first == 0:
            return
        for layer in layers:
            layer.keys, layer.values = layer.keys[..., first:, :], layer.values[..., first:, :]
        self.mask = self.mask[:, first:]


@torch.inference_mode()
def run_batch(decoder: Decoder, requests: Sequence[GenRequest]) -> int:
    """Decode every request to its end together, sending its events as they come (static
    batching: none joins once started); returns how many rows left early because their client
    went away."""
    prefill = Prefill(decoder, requests)
    cohort: Cohort | None = None
    cancelled = 0
    try:
        prefill.run()
        cohort, cancelled = prefill.cohort()
        while len(cohort):
            cancelled += cohort.step()
    except Exception as exc:
        log.exception("generation failed")
        (prefill if cohort is None else cohort).fail(exc)
    return cancelled


def _plain_layers(cache: DynamicCache) -> list | None:
    """The cache's layers when each is a plain full-attention one (keys and values tensors
    [batch, heads, tokens, dim] and nothing else), else None."""
    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):
        return None
    return layers


def _pad_left(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def contiguous_head_input(model: nn.Module) -> RemovableHandle | None:
    """Hand the output head a contiguous input. Why: with `logits_to_keep` the head gets a
    strided view of each row's last position, and on a CPU a bfloat16 matmul of a strided
    [rows, 1, hidden] input broadcasts the whole head per row (demo model, 32 rows of 4 prompt
    tokens: 2.3 s a forward instead of 0.14 s)."""
    head = model.get_output_embeddings()
    if head is None:
        return None
    return head.register_forward_pre_hook(lambda _m, args: (args[0].contiguous(), *args[1:]))


def _generator(seed: int | None, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else random.getrandbits(63))
    return generator


def _choose(logits: torch.Tensor, row: _Row) -> int:
    params = row.request.params
    logits = _adjusted(logits, row)
    if params.temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        cumulative = sorted_probs.cumsum(-1)
        drop = cumulative - sorted_probs > params.top_p  # keep the smallest set reaching top_p
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=row.generator))


def _logprob(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """`token`'s log-probability under the model's own distribution (no penalty, bias or
    temperature), and the `top` likeliest tokens'."""
    logprobs = torch.log_softmax(logits, dim=-1)
    best: tuple[tuple[int, float], ...] = ()
    if top:
        values, ids = logprobs.topk(min(top, logprobs.shape[-1]))
        best = tuple(zip(ids.tolist(), values.tolist(), strict=True))
    return TokenLogprob(token, float(logprobs[token]), best)


def _adjusted(logits: torch.Tensor, row: _Row) -> torch.Tensor:
    """The logits with OpenAI's logit_bias, presence and frequency penalties applied (on the
    tokens generated so far, the prompt's not counted)."""
    params = row.request.params
    penalised = (params.presence_penalty or params.frequency_penalty) and row.tokens
    if not params.logit_bias and not penalised:
        return logits
    logits = logits.clone()
    size = logits.shape[-1]
    bias = [(token, value) for token, value in params.logit_bias if token < size]
    if bias:
        ids = torch.tensor([t for t, _ in bias], device=logits.device)
        logits[ids] += torch.tensor([v for _, v in bias], device=logits.device)
    if penalised:
        ids, counts = torch.tensor(row.tokens, device=logits.device).unique(return_counts=True)
        logits[ids] -= params.frequency_penalty * counts + params.presence_penalty
    return logits


def _advance(lm: LoadedModel, row: _Row, token: int, stop_ids: set[int]) -> bool:
    """Take `token` into the row; False when the row is done (its final event sent)."""
    request = row.request
    if request.cancelled.is_set():
        return False
    row.generated += 1
    if token in stop_ids:
        row.end = (token,)
        return _finish(row, _decode(lm, row.tokens), "stop")
    row.tokens.append(token)
    text = _decode(lm, row.tokens)
    for stop in request.params.stop:
        at = text.find(stop)
        if at >= 0:
            return _finish(row, text[:at], "stop")
    if row.generated >= request.params.max_tokens:
        return _finish(row, text, "length")
    ready = _holdback(text, request.params.stop)
    if len(ready) > len(row.emitted) and ready.startswith(row.emitted):
        row.emit(TextDelta(ready[len(row.emitted) :], row.fresh_logprobs()))
        row.emitted = ready
    return True


def _finish(row: _Row, text: str, reason: str) -> bool:
    # A character cut off by the last token (max_tokens, or an end token mid-character) decodes
    # as U+FFFD: not part of the answer, as streaming already holds it back.
    text = text.rstrip("\ufffd")
    if not text.startswith(row.emitted):  # decoding changed earlier text: keep what was sent
        text = row.emitted
    rest, fresh = text[len(row.emitted) :], row.fresh_logprobs()
    if rest or fresh:
        row.emit(TextDelta(rest, fresh))
    tokens = (*row.tokens, *row.end)
    prompt_tokens = len(row.request.prompt_ids)
    logprobs = tuple(row.logprobs[: len(row.tokens)])  # the end token's left out, as its text
    row.emit(Finished(text, reason, prompt_tokens, row.generated, tokens, time.perf_counter(),
                      logprobs))  # fmt: skip
    return False


def _decode(lm: LoadedModel, tokens: list[int]) -> str:
    return lm.tokenizer.decode(tokens, skip_special_tokens=True)


def _holdback(text: str, stops: Sequence[str]) -> str:
    """`text` minus an unfinished character and any tail that may begin a stop string."""
    text = text.rstrip("\ufffd")
    cut = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                cut = max(cut, n)
                break
    return text[: len(text) - cut] if cut else text
