"""One batch of requests, decoded together with a KV cache, each row with its own version.

Rows are LEFT padded, position ids follow the attention mask, so a padded row gives the tokens it
would give alone. After every step, rows that finished (end token, `max_tokens`, a stop string) or
whose client went away are dropped from the batch and from the KV cache, freeing their slot.
Each row samples with its own parameters and its own random generator (`seed`).
"""

from __future__ import annotations

import inspect
import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from app.ml.models import LoadedModel
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

    def emit(self, event: Event) -> None:
        try:
            self.request.on_event(event)
        except Exception:  # a consumer that went away must not stop the batch
            log.debug("dropping an event of a finished consumer", exc_info=True)


@torch.inference_mode()
def run_batch(
    lm: LoadedModel,
    hooks: BatchDeltaHooks,
    requests: Sequence[GenRequest],
    *,
    stop_ids: set[int],
    pad_id: int,
) -> int:
    """Decode every request to its end, sending its events as they come; returns how many rows
    left early because their client went away."""
    device = lm.device
    rows = [_Row(r, _generator(r.params.seed, device)) for r in requests]
    width = max(len(r.prompt_ids) for r in requests)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, request in enumerate(requests):
        n = len(request.prompt_ids)
        ids[i, width - n :] = torch.tensor(request.prompt_ids, dtype=torch.long)
        mask[i, width - n :] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    cancelled = 0
    hooks.assign([r.weights for r in requests])
    try:
        out = lm.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            **_last_logits_only(lm),
        )
        while True:
            logits = out.logits[:, -1, :].float()
            chosen = [_choose(logits[i], row) for i, row in enumerate(rows)]
            for i, row in enumerate(rows):
                if row.request.params.logprobs is not None:
                    row.logprobs.append(_logprob(logits[i], chosen[i], row.request.params.logprobs))
            cancelled += sum(1 for row in rows if row.request.cancelled.is_set())
            keep = [i for i, row in enumerate(rows) if _advance(lm, row, chosen[i], stop_ids)]
            if not keep:
                return cancelled
            if len(keep) < len(rows):
                index = torch.tensor(keep, device=device)
                cache.batch_select_indices(index)
                mask, positions = mask[index], positions[index]
                rows = [rows[i] for i in keep]
                chosen = [chosen[i] for i in keep]
                hooks.assign([row.request.weights for row in rows])
            mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1)
            positions = positions[:, -1:] + 1
            out = lm.model(
                input_ids=torch.tensor(chosen, device=device).unsqueeze(1),
                attention_mask=mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
            )
    except Exception as exc:
        log.exception("generation failed")
        for row in rows:
            row.emit(Failed(exc))
        return cancelled
    finally:
        hooks.clear()


def _last_logits_only(lm: LoadedModel) -> dict[str, int]:
    """Prefill needs the logits of the last position only (the output head over every prompt
    position would cost as much as several decoding steps)."""
    forward = inspect.signature(lm.model.forward).parameters
    return {"logits_to_keep": 1} if "logits_to_keep" in forward else {}


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
        row.emit(TextDelta(ready[len(row.emitted) :]))
        row.emitted = ready
    return True


def _finish(row: _Row, text: str, reason: str) -> bool:
    if not text.startswith(row.emitted):  # decoding changed earlier text: keep what was sent
        text = row.emitted
    if len(text) > len(row.emitted):
        row.emit(TextDelta(text[len(row.emitted) :]))
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
