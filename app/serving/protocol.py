"""OpenAI-compatible request and response shapes (pydantic), and `/v1/ab`'s. Torch-free.

Requests translate themselves into `SamplingParams` (`to_sampling_params`). Numbers and flags are
strict JSON types (`"max_tokens": "5"` is refused, not read as 5). A parameter this server does
not implement is refused with the error type `unsupported_parameter` naming it (the API answers
400), unless it asks for what the server does anyway (`"response_format": {"type": "text"}`,
`"tool_choice": "none"`, ...) or is bookkeeping that changes no answer (`metadata`, `store`, ...);
an unknown parameter is refused alike (`extra_forbidden`). A request may ask for `n` choices
and, on `/v1/completions`, give several prompts, as text or as token ids: at most `MAX_CHOICES`
answers in all. Log-probabilities (`logprobs`, chat's `top_logprobs`) come with whole answers
and, streamed, with each chunk for the tokens that chunk's text came from.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema
from pydantic_core import PydanticCustomError

from app.serving.sampling import SamplingParams
from app.validation import UnicodeStr, valid_unicode_texts

MAX_STOPS = 4
MAX_CHOICES = 32  # answers one request may ask for: prompts × n

# Beyond any context window: larger is a mistake (422), smaller is capped by the server.
MAX_TOKENS_FIELD = 1_000_000
MAX_LOGIT_BIAS = 300  # entries, as OpenAI allows
MAX_TOP_LOGPROBS = 20
Number = StrictFloat  # a JSON number (an integer too), never a string or a boolean


def _unsupported(*accepted: Any) -> Any:
    """The type of an OpenAI parameter this server does not implement: refused unless absent or
    one of the `accepted` values (those asking for what the server does anyway)."""

    def check(value: Any) -> Any:
        if value is not None and not any(type(value) is type(a) and value == a for a in accepted):
            raise PydanticCustomError(
                "unsupported_parameter", "this parameter is not supported by this server"
            )
        return None

    return SkipJsonSchema[Annotated[Any, AfterValidator(check)]]


# Bookkeeping parameters of OpenAI's API that change no answer: accepted, ignored.
Ignored = SkipJsonSchema[Any]


def _check_logit_bias(bias: dict[str, Any] | None) -> dict[str, Any] | None:
    if bias is None:
        return None
    if len(bias) > MAX_LOGIT_BIAS:
        raise ValueError(f"at most {MAX_LOGIT_BIAS} tokens")
    for token, value in bias.items():
        if not token.isascii() or not token.isdigit():
            raise ValueError(f"keys must be token ids (non-negative integers), not {token!r}")
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not -100 <= value <= 100
        ):
            raise ValueError(f"token {token}: the bias must be a number from -100 to 100")
    return bias


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: UnicodeStr = Field(
        description='"base", a version name, "latest", or "exp:<name>" (an experiment picks)'
    )
    user: UnicodeStr | None = Field(
        None, max_length=256, description="who asks; in an experiment, the same user, the same arm"
    )
    max_tokens: StrictInt | None = Field(
        None, ge=1, le=MAX_TOKENS_FIELD, description="capped by the server and the context"
    )
    temperature: Number = Field(1.0, ge=0, le=2, description="0: greedy")
    top_p: Number = Field(1.0, gt=0, le=1)
    n: StrictInt = Field(
        1, ge=1, le=MAX_CHOICES, description="answers per prompt (with a seed: seed, seed + 1, ...)"
    )
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: StrictInt | None = None
    presence_penalty: Number = Field(
        0.0, ge=-2, le=2, description="subtracted from the logit of every token already generated"
    )
    frequency_penalty: Number = Field(
        0.0, ge=-2, le=2,
        description="times how often a token was generated, subtracted from its logit",
    )  # fmt: skip
    logit_bias: dict[str, Any] | None = Field(
        None, description='added to the logits of the token ids given as keys: {"50256": -100}'
    )
    # OpenAI's, not implemented here: refused unless they ask for the default.
    tools: _unsupported() = None
    tool_choice: _unsupported("none") = None
    functions: _unsupported() = None
    function_call: _unsupported("none") = None
    response_format: _unsupported({"type": "text"}) = None
    audio: _unsupported() = None
    modalities: _unsupported(["text"]) = None
    prediction: _unsupported() = None
    reasoning_effort: _unsupported() = None
    verbosity: _unsupported() = None
    web_search_options: _unsupported() = None
    best_of: _unsupported(1) = None
    echo: _unsupported(False) = None
    suffix: _unsupported() = None
    metadata: Ignored = None
    store: Ignored = None
    service_tier: Ignored = None
    parallel_tool_calls: Ignored = None
    prompt_cache_key: Ignored = None
    safety_identifier: Ignored = None

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return _check_logit_bias(value)

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        valid_unicode_texts(stops)
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return value

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def requested_tokens(self) -> int | None:
        return self.max_tokens

    def wanted_logprobs(self) -> int | None:
        """None: no log-probabilities; k: each token's, and the k likeliest alternatives."""
        return None

    def to_sampling_params(self, max_tokens: int, choice: int = 0) -> SamplingParams:
        """The sampling parameters of the `choice`-th answer to a prompt (its own seed)."""
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            stop=self.stops(),
            seed=None if self.seed is None else self.seed + choice,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            logit_bias=tuple((int(k), float(v)) for k, v in (self.logit_bias or {}).items()),
            logprobs=self.wanted_logprobs(),
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: StrictBool = False


TokenIds = Annotated[list[StrictInt], Field(min_length=1)]


def _token_ids(value: Any) -> bool:
    """A non-empty list of token ids (integers from 0)."""
    return isinstance(value, list) and bool(value) and all(
        type(t) is int and t >= 0 for t in value
    )  # fmt: skip


def _prompt_count(value: Any) -> int | None:
    """How many prompts `value` holds, if it has one of the accepted shapes: a string, a list of
    strings, a list of token ids, or a list of such lists."""
    if isinstance(value, str) or _token_ids(value):
        return 1
    if not isinstance(value, list) or not value:
        return None
    if all(isinstance(p, str) for p in value) or all(_token_ids(p) for p in value):
        return len(value)
    return None


class CompletionRequest(_Request):
    prompt: str | list[str] | TokenIds | list[TokenIds] = Field(
        description="a prompt, or a list of them: as text or as token ids"
    )
    logprobs: StrictInt | None = Field(
        None, ge=0, le=MAX_TOP_LOGPROBS,
        description="the log-probability of each generated token and of the N likeliest "
        "tokens at its place (the model's own distribution, before sampling settings)",
    )  # fmt: skip
    top_logprobs: _unsupported() = None

    def wanted_logprobs(self) -> int | None:
        return self.logprobs

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, value: Any, info: ValidationInfo) -> Any:
        """One clear error for a prompt of no accepted shape (not one per union member), and
        at most `MAX_CHOICES` answers in all."""
        count = _prompt_count(value)
        if count is None:
            raise PydanticCustomError(
                "prompt_shape", "give a string, a list of strings, a list of token ids (integers "
                "from 0) or a list of such lists, none of them empty",
            )  # fmt: skip
        n = info.data.get("n", 1)
        if count * n > MAX_CHOICES:
            raise PydanticCustomError(
                "too_many_choices",
                f"{count} prompts × n={n} ask for more than {MAX_CHOICES} answers",
            )
        return value

    @field_validator("prompt")
    @classmethod
    def _unicode(cls, value: Any) -> Any:
        texts = isinstance(value, str) or isinstance(value[0], str)
        return valid_unicode_texts(value) if texts else value

    def prompts(self) -> list[str | list[int]]:
        """Each prompt: its text, or its token ids."""
        prompt = self.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            return [prompt]  # type: ignore[list-item]
        return list(prompt)  # type: ignore[arg-type]


class TextPart(BaseModel):
    type: Literal["text"]
    text: UnicodeStr


_CONTENT_KINDS = {"image_url": "image", "input_audio": "audio", "file": "file"}


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, value: Any) -> Any:
        for part in value if isinstance(value, list) else ():
            kind = part.get("type") if isinstance(part, dict) else None
            if isinstance(kind, str) and kind != "text":
                what = _CONTENT_KINDS.get(kind, kind)
                raise PydanticCustomError(
                    "unsupported_content",
                    "{what} input is not supported: this server takes text parts only",
                    {"what": what[:40]},
                )
        return value

    @field_validator("content")
    @classmethod
    def _valid_unicode(cls, value: str | list[TextPart]) -> str | list[TextPart]:
        return valid_unicode_texts(value)  # the parts' texts check themselves

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1, le=MAX_TOKENS_FIELD)
    logprobs: StrictBool = Field(
        False,
        description="the log-probability of each generated token (the model's own "
        "distribution, before sampling settings)",
    )
    top_logprobs: StrictInt | None = Field(
        None, ge=0, le=MAX_TOP_LOGPROBS, description="with logprobs: the N likeliest tokens too"
    )

    @field_validator("top_logprobs")
    @classmethod
    def _with_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and not info.data.get("logprobs"):
            raise ValueError("needs logprobs set to true")
        return value

    def wanted_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def requested_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def plain_messages(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]

    def last_user_text(self) -> str:
        """What a judge sees as the prompt: the last user turn (or the last message)."""
        users = [m.text() for m in self.messages if m.role == "user"]
        return users[-1] if users else self.messages[-1].text()


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


class CompletionLogprobs(BaseModel):
    """The legacy completions shape: one entry per generated token, in order."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None = None
    logprobs: CompletionLogprobs | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str | None = None
    logprobs: ChatLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: str | None = None
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "detox"
    parent: str | None = Field(None, description='"base" or the parent version; null for the base')


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class AbRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    prompt: UnicodeStr | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    arms: list[UnicodeStr] = Field(min_length=1, max_length=16, description='e.g. ["base", "v3"]')
    max_tokens: StrictInt | None = Field(None, ge=1, le=MAX_TOKENS_FIELD)
    temperature: Number = Field(0.0, ge=0, le=2, description="0 (greedy) by default")
    top_p: Number = Field(1.0, gt=0, le=1)
    seed: StrictInt | None = None
    judge: StrictBool = Field(True, description="score each arm's text with the configured judge")
    harmful: StrictBool = Field(
        True,
        description="judge the prompt as a harmful request (unsafe: not declined) or, with "
        "false, as an everyday one (unsafe: refused, i.e. over-refusal)",
    )

    @model_validator(mode="after")
    def _one_input(self) -> AbRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of `prompt` and `messages`")
        return self

    def judged_prompt(self) -> str:
        """The text the judge sees as the prompt: the last user turn."""
        if self.prompt is not None:
            return self.prompt
        users = [m.text() for m in self.messages or [] if m.role == "user"]
        return users[-1] if users else ""

    def to_sampling_params(self, max_tokens: int) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, seed=self.seed
        )


class AbArm(BaseModel):
    model: str
    text: str
    unsafe_score: float | None
    refused: bool | None = Field(None, description="the judge's refusal verdict (null: not judged)")
    latency_ms: float
    finish_reason: str
    usage: Usage


class AbResponse(BaseModel):
    arms: list[AbArm]
    judge: str | None = Field(None, description="the judge that produced the scores")
