"""Batched text generation for evaluation and the CLI.

Prompts are user turns, wrapped in the model's chat template by default. Batches are LEFT padded so
every row's last prompt token sits at the same position and new tokens follow it directly; the
model's attention mask (and the position ids transformers derives from it) make a padded row give
the same greedy tokens as the row run alone. Prompts are sorted by length before batching so rows
of a batch need little padding; results come back in the caller's order.

A prompt that leaves fewer than `max_new_tokens` positions in the context is cut on the LEFT (the
end of a chat prompt, where the question and the assistant header are, matters most), and the
result records how many tokens were dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import (
    GenerationConfig,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
)

from app.ml.errors import InputError
from app.ml.models import LoadedModel
from app.ml.prompts import chat_text, encode_prompt


@dataclass
class Generation:
    """One completion: the decoded new text and its token accounting."""

    text: str  # new tokens only, special tokens skipped, whitespace stripped
    prompt_tokens: int  # prompt tokens fed to the model (after truncation)
    completion_tokens: int  # new tokens, counting the end-of-sequence token that stopped it
    truncated: int = 0  # prompt tokens dropped on the left to fit the context


@torch.inference_mode()
def generate(
    lm: LoadedModel,
    prompts: list[str],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    chat: bool = True,
    progress: Callable[[float], None] | None = None,
) -> list[Generation]:
    """Complete every prompt; greedy when `temperature` is 0, nucleus sampling otherwise.

    `progress(fraction)`, when given, is called after every generated token with the share of
    the work done (a batch counts as done by `max_new_tokens`), so one long batch moves too.
    """
    _check_params(lm, max_new_tokens, batch_size, temperature, top_p)
    if not prompts:
        return []
    tokenizer = lm.tokenizer
    budget = lm.context_length - max_new_tokens
    encoded = [_encode(tokenizer, p, chat=chat, budget=budget) for p in prompts]
    config = _generation_config(lm, max_new_tokens, temperature, top_p)
    stop_ids = _stop_ids(lm)

    # Longest first: the slowest batch runs while memory is free, and batch rows match in length.
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i][0]), reverse=True)
    results: list[Generation | None] = [None] * len(prompts)
    with _seeded(seed, lm.device), _left_padding(tokenizer):
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            batch = tokenizer.pad(
                {"input_ids": [encoded[i][0] for i in rows]}, padding=True, return_tensors="pt"
            )
            input_ids = batch["input_ids"].to(lm.device)
            watch = None
            if progress is not None:
                done, share = start / len(order), len(rows) / len(order)
                watch = StoppingCriteriaList(
                    [_TokenProgress(progress, done, share, input_ids.shape[1], max_new_tokens)]
                )
            output = lm.model.generate(
                input_ids=input_ids,
                attention_mask=batch["attention_mask"].to(lm.device),
                generation_config=config,
                stopping_criteria=watch,
            )
            new_tokens = output[:, input_ids.shape[1] :].tolist()
            for i, tokens in zip(rows, new_tokens, strict=True):
                ids, dropped = encoded[i]
                results[i] = _finish(tokenizer, tokens, stop_ids, len(ids), dropped)
            if progress is not None:
                progress(min(1.0, (start + len(rows)) / len(order)))
    return [r for r in results if r is not None]


class _TokenProgress(StoppingCriteria):
    """Never stops anything: after each new token, reports `done + share * tokens / max_new`."""

    def __init__(
        self, progress: Callable[[float], None], done: float, share: float, prompt: int, new: int
    ):
        self._progress, self._done, self._share = progress, done, share
        self._prompt, self._new = prompt, new

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **_: object) -> torch.Tensor:
        made = min(1.0, (input_ids.shape[1] - self._prompt) / self._new)
        self._progress(min(1.0, self._done + self._share * made))
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _check_params(
    lm: LoadedModel, max_new_tokens: int, batch_size: int, temperature: float, top_p: float
) -> None:
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if max_new_tokens >= lm.context_length:
        raise InputError(
            f"max_new_tokens ({max_new_tokens}) must be below the model's context length "
            f"({lm.context_length}) to leave room for the prompt"
        )
    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, got {batch_size}")
    if temperature < 0:
        raise InputError(f"temperature must be 0 or more, got {temperature}")
    if not 0 < top_p <= 1:
        raise InputError(f"top_p must be in (0, 1], got {top_p}")


def _encode(
    tokenizer: PreTrainedTokenizerBase, prompt: str, *, chat: bool, budget: int
) -> tuple[list[int], int]:
    """Token ids of one prompt cut to `budget` on the left, and how many were dropped."""
    text = chat_text(tokenizer, prompt) if chat else prompt
    ids = encode_prompt(tokenizer, text)
    dropped = max(0, len(ids) - budget)
    return ids[dropped:], dropped


def _generation_config(
    lm: LoadedModel, max_new_tokens: int, temperature: float, top_p: float
) -> GenerationConfig:
    """A complete config, so a model's own sampling defaults never leak into greedy decoding."""
    sample = temperature > 0
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=sample,
        temperature=temperature if sample else None,
        top_p=top_p if sample else None,
        top_k=None,  # GenerationConfig defaults top_k to 50; only nucleus sampling is asked for
        num_beams=1,
        eos_token_id=sorted(_stop_ids(lm)),
        pad_token_id=_pad_id(lm),
        bos_token_id=lm.tokenizer.bos_token_id,
    )


def _stop_ids(lm: LoadedModel) -> set[int]:
    """The tokenizer's end-of-sequence token plus any the model's generation config lists."""
    ids: set[int] = set()
    for value in (
        lm.tokenizer.eos_token_id,
        getattr(lm.model.generation_config, "eos_token_id", None),
    ):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(v for v in value if isinstance(v, int))
    return ids


def _pad_id(lm: LoadedModel) -> int:
    tokenizer = lm.tokenizer
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id):
        if value is not None:
            return value
    raise InputError(f"model {lm.name!r}: the tokenizer has no pad, end or unknown token")


def _finish(
    tokenizer: PreTrainedTokenizerBase,
    tokens: list[int],
    stop_ids: set[int],
    prompt_tokens: int,
    dropped: int,
) -> Generation:
    # Rows that stopped early are filled with padding after their end token: cut at the first one.
    end = next((n for n, t in enumerate(tokens) if t in stop_ids), None)
    kept = tokens if end is None else tokens[:end]
    text = tokenizer.decode(kept, skip_special_tokens=True).strip()
    used = len(tokens) if end is None else end + 1
    return Generation(
        text=text, prompt_tokens=prompt_tokens, completion_tokens=used, truncated=dropped
    )


@contextmanager
def _left_padding(tokenizer: PreTrainedTokenizerBase) -> Iterator[None]:
    saved = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        yield
    finally:
        tokenizer.padding_side = saved


@contextmanager
def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Seed sampling without disturbing the caller's global random state."""
    if seed is None:
        yield
        return
    # On CUDA the sampler draws from that device's generator, so fork and seed it too.
    cuda = device.type == "cuda"
    devices = (
        [device.index if device.index is not None else torch.cuda.current_device()] if cuda else []
    )
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
