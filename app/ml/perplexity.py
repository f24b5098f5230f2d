"""Perplexity of a causal LM on plain text, and the teacher-forced token log-probabilities that
it and `app.ml.bias` are computed from.

Encoding: each text on its own, no chat template and none of the tokenizer's own special tokens;
the BOS token is prepended when the tokenizer has one, so that the first real token is predicted
too (without a BOS the first token has no predictor and is not counted). A text longer than the
model's context, or than `max_length` tokens when given (BOS included), keeps its first tokens.

    perplexity = exp( Σ_texts Σ_{t=1}^{n−1} −log P(x_t | x_0 … x_{t−1}) / Σ_texts (n − 1) )

that is, the exponential of the mean negative log-likelihood per predicted token over all texts
together (a long text weighs more than a short one), not a mean of per-text perplexities.

Batches are RIGHT padded with an attention mask: the real tokens keep positions 0 … n−1 and never
attend to padding, so a row scores the same batched as alone. Sequences are sorted by length
before batching (less padding); results come back in the caller's order. Log-softmax is taken in
float32 whatever the model's dtype (bfloat16 on CUDA). The packaged reference text
(`app/ml/data/reference_text.json`) is project-owned: 40 short, neutral, factual paragraphs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from importlib import resources

import torch
from transformers import PreTrainedTokenizerBase

from app.ml.errors import InputError
from app.ml.models import LoadedModel

REFERENCE_TEXT = "data/reference_text.json"


def reference_texts() -> list[str]:
    """The packaged reference paragraphs."""
    text = resources.files("app.ml").joinpath(REFERENCE_TEXT).read_text("utf-8")
    return list(json.loads(text))


def perplexity(
    lm: LoadedModel,
    texts: Sequence[str] | None = None,
    *,
    batch_size: int = 8,
    max_length: int | None = None,
    progress: Callable[[float], None] | None = None,
) -> dict[str, float | int]:
    """{"perplexity", "tokens" (predicted), "texts"} over `texts` (default: the reference text);
    `progress(fraction)` after each batch."""
    chosen = reference_texts() if texts is None else list(texts)
    if not chosen:
        raise InputError("perplexity: no texts to score")
    for n, text in enumerate(chosen):
        if not isinstance(text, str):
            raise InputError(f"perplexity: text {n} is a {type(text).__name__}, not a string")
    if max_length is not None and max_length < 2:
        raise InputError("perplexity: max_length must be at least 2 tokens")
    length = min(lm.context_length, max_length or lm.context_length)
    sequences = [encode_text(lm.tokenizer, text, max_length=length) for text in chosen]
    logprobs = token_logprobs(lm, sequences, batch_size=batch_size, progress=progress)
    tokens = sum(len(row) for row in logprobs)
    if tokens == 0:
        raise InputError("perplexity: the texts hold no token to predict")
    nll = -sum(row.double().sum().item() for row in logprobs)
    return {"perplexity": math.exp(nll / tokens), "tokens": tokens, "texts": len(chosen)}


def encode_text(tokenizer: PreTrainedTokenizerBase, text: str, *, max_length: int) -> list[int]:
    """Token ids of `text`: BOS (when the tokenizer has one) + the text's tokens, cut to length."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    bos = tokenizer.bos_token_id
    if bos is None:
        return ids[:max_length]
    return [bos, *ids[: max_length - 1]]


def token_logprobs(
    lm: LoadedModel,
    sequences: Sequence[Sequence[int]],
    *,
    batch_size: int = 8,
    progress: Callable[[float], None] | None = None,
) -> list[torch.Tensor]:
    """Per sequence x_0 … x_{n−1}, the float32 CPU tensor [log P(x_t | x_<t) for t = 1 … n−1]."""
    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, not {batch_size}")
    out = [torch.zeros(0) for _ in sequences]  # a sequence under 2 tokens predicts nothing
    order = sorted(
        (i for i, s in enumerate(sequences) if len(s) > 1), key=lambda i: len(sequences[i])
    )
    with _evaluating(lm.model), torch.inference_mode():
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            for i, row in zip(chunk, _forward(lm, [sequences[i] for i in chunk]), strict=True):
                out[i] = row
            if progress is not None:
                progress((start + len(chunk)) / len(order))
    return out


def _forward(lm: LoadedModel, rows: list[Sequence[int]]) -> list[torch.Tensor]:
    longest = max(len(row) for row in rows)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), longest), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for n, row in enumerate(rows):
        ids[n, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[n, : len(row)] = 1
    ids, mask = ids.to(lm.device), mask.to(lm.device)
    logits = lm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    # Row by row, so that only one row's logits exist in float32 at a time.
    return [
        _row_logprobs(logits[n, : len(row) - 1], ids[n, 1 : len(row)]) for n, row in enumerate(rows)
    ]


def _row_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # The logits at position t−1 predict the token at t.
    logprobs = logits.float().log_softmax(dim=-1)
    return logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1).cpu()


@contextmanager
def _evaluating(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) for the scoring, then the caller's mode back (e.g. mid-training)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
