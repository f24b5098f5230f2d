"""What a request asks for and what it gets back, free of torch (the API imports this)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float = 0.0  # OpenAI's: minus this on every token generated so far
    frequency_penalty: float = 0.0  # minus this times each token's count so far
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    logprobs: int | None = None  # None: none; k: each new token's and the k likeliest ones'


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the model (its raw distribution), and the
    likeliest tokens at its place as (token id, log-probability), best first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class TextDelta:
    text: str
    # asked for: the tokens' this text came from (a token may bring no text of its own yet)
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Finished:
    text: str  # the whole completion (the concatenation of every TextDelta)
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    token_ids: tuple[int, ...] = ()  # new tokens, the end token included when one stopped it
    finished_at: float = 0.0  # time.perf_counter() when the last token was taken
    logprobs: tuple[TokenLogprob, ...] = ()  # asked for: one per token of `text` (end excluded)


@dataclass(frozen=True)
class Failed:
    error: BaseException


Event = TextDelta | Finished | Failed
