"""OpenAI-compatible request and response shapes (pydantic), and `/v1/ab`'s. Torch-free.

Requests translate themselves into `SamplingParams` (`to_sampling_params`). Fields the OpenAI
client may send that this server does not implement are accepted and ignored, except `n` > 1,
which is refused (422).
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.serving.sampling import SamplingParams
from app.validation import UnicodeStr, valid_unicode_texts

MAX_STOPS = 4

# Beyond any context window: larger is a mistake (422), smaller is capped by the server.
MAX_TOKENS_FIELD = 1_000_000


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: UnicodeStr = Field(
        description='"base", a version name, "latest", or "exp:<name>" (an experiment picks)'
    )
    user: UnicodeStr | None = Field(
        None, max_length=256, description="who asks; in an experiment, the same user, the same arm"
    )
    max_tokens: int | None = Field(
        None, ge=1, le=MAX_TOKENS_FIELD, description="capped by the server and the context"
    )
    temperature: float = Field(1.0, ge=0, le=2, description="0: greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, description="only 1 is supported")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int) -> int:
        if value != 1:
            raise ValueError("only n=1 is supported")
        return value

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

    def to_sampling_params(self, max_tokens: int) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            stop=self.stops(),
            seed=self.seed,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class StreamOptions(BaseModel):
    include_usage: bool = False


class CompletionRequest(_Request):
    prompt: str | list[str] = Field(description="one prompt (a list must hold exactly one)")

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("exactly one prompt is supported")
        return valid_unicode_texts(value)

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class TextPart(BaseModel):
    type: Literal["text"]
    text: UnicodeStr


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

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
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_FIELD)

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


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None = None
    logprobs: None = None


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


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str | None = None
    logprobs: None = None


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
    logprobs: None = None


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
    model_config = ConfigDict(extra="forbid")

    prompt: UnicodeStr | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    arms: list[UnicodeStr] = Field(min_length=1, max_length=16, description='e.g. ["base", "v3"]')
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_FIELD)
    temperature: float = Field(0.0, ge=0, le=2, description="0 (greedy) by default")
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None
    judge: bool = Field(True, description="score each arm's text with the configured judge")

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
    latency_ms: float
    finish_reason: str
    usage: Usage


class AbResponse(BaseModel):
    arms: list[AbArm]
    judge: str | None = Field(None, description="the judge that produced the scores")
