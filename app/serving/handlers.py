"""The OpenAI-compatible handlers: requests in, response models or SSE lines out.

Built once per app around an `Engine` (anything with its interface: tests may pass a fake), and
optionally a `TrafficRouter` (`app.serving.traffic`) that routes some models elsewhere and watches
their responses: experiments plug in there. Blocking steps (resolving and loading a version,
tokenising, judging) run in worker threads so the event loop stays free; errors are the typed
`app.serving.errors`, which the router maps to HTTP. Torch-free at import: the engine module is
only named for type checking.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from functools import partial
from typing import TYPE_CHECKING

from pydantic import BaseModel

from app.serving.errors import InvalidParameterError, UnknownModelError
from app.serving.protocol import (
    AbArm,
    AbRequest,
    AbResponse,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChatLogprobs,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    ModelCard,
    ModelList,
    TokenLogprob,
    TopLogprob,
    Usage,
    new_id,
    now,
)
from app.serving.sampling import Event, Failed, Finished, TextDelta
from app.serving.sampling import TokenLogprob as TokenLogprobEvent
from app.serving.traffic import Route, ServedResponse, TrafficRouter

if TYPE_CHECKING:
    from app.ml.judges import Verdict
    from app.serving.engine_base import EngineBase as Engine
    from app.serving.engine_base import Target

DONE = "data: [DONE]\n\n"


def sse(payload: BaseModel | dict) -> str:
    body = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {body}\n\n"


class OpenAIHandlers:
    def __init__(
        self, engine: Engine, *, started: int | None = None, traffic: TrafficRouter | None = None
    ):
        self.engine = engine
        self.started = started or now()
        self.traffic = traffic  # routes some models elsewhere (`exp:<name>`); else none is routed

    # -- /v1/models ------------------------------------------------------------------------

    def models(self) -> ModelList:
        cards = [ModelCard(id="base", created=self.started, parent=None)]
        cards += [
            ModelCard(id=v.name, created=int(v.created_at.timestamp()), parent=v.parent)
            for v in self.engine.versions()
        ]
        return ModelList(data=cards)

    def model(self, name: str) -> ModelCard:
        """One model's card: `base`, a live version, or `latest` as the version it names now
        (the name its answers carry). Blocking: may re-read the versions."""
        version = self.engine.resolve(name)
        if version is None:
            return ModelCard(id="base", created=self.started, parent=None)
        created = int(version.created_at.timestamp())
        return ModelCard(id=version.name, created=created, parent=version.parent)

    # -- /v1/completions and /v1/chat/completions ------------------------------------------

    async def completion(self, request: CompletionRequest) -> Completion | AsyncIterator[str]:
        def respond(rid: str, created: int, target: Target, result: Finished) -> Completion:
            return Completion(
                id=rid,
                created=created,
                model=target.name,
                choices=[CompletionChoice(
                    text=result.text, finish_reason=result.finish_reason,
                    logprobs=self._completion_logprobs(request, result),
                )],
                usage=Usage.of(result.prompt_tokens, result.completion_tokens),
            )  # fmt: skip

        text = request.text()
        encode = partial(self.engine.encode_text, text)
        return await self._serve(request, encode, text, "cmpl", self._completion_stream, respond)

    async def chat(self, request: ChatCompletionRequest) -> ChatCompletion | AsyncIterator[str]:
        def respond(rid: str, created: int, target: Target, result: Finished) -> ChatCompletion:
            message = AssistantMessage(content=result.text)
            choice = ChatChoice(
                message=message,
                finish_reason=result.finish_reason,
                logprobs=self._chat_logprobs(request, result),
            )
            return ChatCompletion(
                id=rid,
                created=created,
                model=target.name,
                choices=[choice],
                usage=Usage.of(result.prompt_tokens, result.completion_tokens),
            )

        encode = partial(self.engine.encode_chat, request.plain_messages())
        prompt = request.last_user_text()
        return await self._serve(request, encode, prompt, "chatcmpl", self._chat_stream, respond)

    def _top(self, entry: TokenLogprobEvent) -> list[tuple[str, float]]:
        return [(self.engine.token_text(t), lp) for t, lp in entry.top]

    def _completion_logprobs(
        self, request: CompletionRequest, result: Finished
    ) -> CompletionLogprobs | None:
        if request.wanted_logprobs() is None:
            return None
        tokens = [self.engine.token_text(e.token) for e in result.logprobs]
        offsets, at = [], 0
        for token in tokens:
            offsets.append(at)
            at += len(token)
        return CompletionLogprobs(
            tokens=tokens,
            token_logprobs=[e.logprob for e in result.logprobs],
            top_logprobs=[dict(self._top(e)) for e in result.logprobs]
            if request.logprobs
            else None,
            text_offset=offsets,
        )

    def _chat_logprobs(
        self, request: ChatCompletionRequest, result: Finished
    ) -> ChatLogprobs | None:
        if request.wanted_logprobs() is None:
            return None

        def utf8(text: str) -> list[int]:
            return list(text.encode("utf-8", errors="replace"))

        content = []
        for entry in result.logprobs:
            text = self.engine.token_text(entry.token)
            top = [TopLogprob(token=t, logprob=lp, bytes=utf8(t)) for t, lp in self._top(entry)]
            content.append(
                TokenLogprob(token=text, logprob=entry.logprob, bytes=utf8(text), top_logprobs=top)
            )
        return ChatLogprobs(content=content)

    async def _serve(self, request, encode, prompt: str, id_prefix: str, stream, respond):
        """Both endpoints' steps: route and resolve the model, tokenise, then stream the events
        (`stream`) or wait for the whole result (`respond`); a watched route hears of it."""
        start = time.perf_counter()
        route, target, ids = await asyncio.to_thread(self._prepare, request, encode)
        self._check_logit_bias(request)
        params = request.to_sampling_params(
            self.engine.token_budget(ids, request.requested_tokens())
        )
        rid, created = new_id(id_prefix), now()
        served = self._watcher(route, rid, prompt, start)
        if request.stream:
            events = await self._started(ids, target, params)
            return stream(request, rid, created, target, served(events))
        result = await self.engine.complete(ids, target, params)
        served.finished(result)
        return respond(rid, created, target, result)

    def _check_logit_bias(self, request: CompletionRequest | ChatCompletionRequest) -> None:
        vocab = getattr(self.engine, "vocab_size", None)
        beyond = [t for t in request.logit_bias or {} if vocab is not None and int(t) >= vocab]
        if beyond:
            raise InvalidParameterError(
                f"logit_bias: token {beyond[0]} is beyond the model's vocabulary (0-{vocab - 1})",
                "logit_bias",
            )

    def _prepare(
        self, request: CompletionRequest | ChatCompletionRequest, encode: Callable[[], list[int]]
    ) -> tuple[Route | None, Target, list[int]]:
        """The request's route (for a routed model such as `exp:<name>`), the resolved model and
        the prompt's ids. Blocking: may read the store and load a version."""
        route = None
        if self.traffic is not None:
            route = self.traffic.route(request.model, request.user)
        if route is None:
            return None, self.engine.target(request.model), encode()
        try:
            target = self.engine.target(route.model)
        except UnknownModelError:
            raise UnknownModelError(
                f"{request.model}'s arm {route.model!r} is no longer served (retired?); "
                "stop the experiment, naming another arm as its winner"
            ) from None
        return route, target, encode()

    def _watcher(self, route: Route | None, rid: str, prompt: str, start: float) -> _Watcher:
        traffic = self.traffic if route is not None and route.watched else None
        return _Watcher(traffic, route, rid, prompt, start)

    async def _started(self, ids, target, params) -> AsyncIterator[Event]:
        """The engine's stream, its first event already taken: admission (a full engine raises
        OverloadedError) and the prompt's prefill happen before the HTTP response starts, so
        their errors are still HTTP errors."""
        events = self.engine.stream(ids, target, params)
        try:
            first = await anext(events)
        except BaseException:
            await events.aclose()
            raise
        return _prepended(first, events)

    def _completion_stream(self, request, rid, created, target, events) -> AsyncIterator[str]:
        def chunk(text: str, finish: str | None, usage: Usage | None = None) -> Completion:
            choices = [CompletionChoice(text=text, finish_reason=finish)] if usage is None else []
            return Completion(
                id=rid, created=created, model=target.name, choices=choices, usage=usage
            )

        return self._events(request, events, chunk)

    def _chat_stream(self, request, rid, created, target, events) -> AsyncIterator[str]:
        first = True

        def chunk(text: str, finish: str | None, usage: Usage | None = None):
            nonlocal first
            choices = []
            if usage is None:
                delta = ChatDelta(role="assistant" if first else None, content=text)
                if finish is not None and not text:
                    delta = ChatDelta()
                choices = [ChatChunkChoice(delta=delta, finish_reason=finish)]
                first = False
            return ChatCompletionChunk(
                id=rid, created=created, model=target.name, choices=choices, usage=usage
            )

        return self._events(request, events, chunk)

    async def _events(self, request, events, chunk) -> AsyncIterator[str]:
        # aclosing: when the client goes away, the engine's stream is closed at once, which
        # cancels the request and frees its slot in the batch.
        async with aclosing(events):
            async for line in self._lines(request, events, chunk):
                yield line
        yield DONE

    async def _lines(self, request, events, chunk) -> AsyncIterator[str]:
        async for event in events:
            if isinstance(event, TextDelta):
                yield sse(chunk(event.text, None))
            elif isinstance(event, Finished):
                yield sse(chunk("", event.finish_reason))
                if request.include_usage:
                    usage = Usage.of(event.prompt_tokens, event.completion_tokens)
                    yield sse(chunk("", None, usage))
            elif isinstance(event, Failed):
                message = f"generation failed: {event.error}"
                yield sse({"error": {"message": message, "type": "internal_error",
                                     "param": None, "code": "generation_failed"}})  # fmt: skip

    # -- /v1/ab ----------------------------------------------------------------------------

    async def ab(self, request: AbRequest) -> AbResponse:
        def prepare() -> tuple[list[Target], list[int]]:
            targets = [self.engine.target(arm) for arm in request.arms]
            if request.messages is not None:
                ids = self.engine.encode_chat(
                    [{"role": m.role, "content": m.text()} for m in request.messages]
                )
            else:
                ids = self.engine.encode_chat([{"role": "user", "content": request.prompt or ""}])
            return targets, ids

        targets, ids = await asyncio.to_thread(prepare)
        params = request.to_sampling_params(self.engine.token_budget(ids, request.max_tokens))
        start = time.perf_counter()
        results = await self.engine.complete_together([(ids, t, params) for t in targets])
        verdicts: list[Verdict | None] = [None] * len(results)
        judge_name = None
        if request.judge:
            prompts = [request.judged_prompt()] * len(results)
            judge_name, judged = await asyncio.to_thread(
                self.engine.verdicts, prompts, [r.text for r in results], harmful=request.harmful
            )
            verdicts = list(judged)
        arms = [
            AbArm(
                model=target.name,
                text=result.text,
                unsafe_score=None if verdict is None else round(verdict.score, 4),
                refused=None if verdict is None else verdict.refused,
                latency_ms=round(max(0.0, result.finished_at - start) * 1000, 1),
                finish_reason=result.finish_reason,
                usage=Usage.of(result.prompt_tokens, result.completion_tokens),
            )
            for target, result, verdict in zip(targets, results, verdicts, strict=True)
        ]
        return AbResponse(arms=arms, judge=judge_name)


class _Watcher:
    """Hands a watched route's response to the traffic router once it has finished (a stream
    that ends early counts for nothing). Without a router it does nothing."""

    def __init__(self, traffic, route, response_id: str, prompt: str, start: float):
        self._traffic = traffic
        self._route = route
        self._response_id = response_id
        self._prompt = prompt
        self._start = start

    def finished(self, result: Finished) -> None:
        if self._traffic is None:
            return
        self._traffic.served(
            self._route,
            ServedResponse(
                response_id=self._response_id,
                prompt=self._prompt,
                text=result.text,
                latency_ms=round((time.perf_counter() - self._start) * 1000, 1),
                prompt_tokens=result.prompt_tokens,
                completion_tokens=result.completion_tokens,
                finish_reason=result.finish_reason,
            ),
        )

    def __call__(self, events: AsyncIterator[Event]) -> AsyncIterator[Event]:
        return events if self._traffic is None else self._watched(events)

    async def _watched(self, events: AsyncIterator[Event]) -> AsyncIterator[Event]:
        async with aclosing(events):
            async for event in events:
                if isinstance(event, Finished):
                    self.finished(event)
                yield event


async def _prepended(first: Event, events: AsyncIterator[Event]) -> AsyncIterator[Event]:
    """`first`, then the rest of `events` (closed with this generator)."""
    async with aclosing(events):
        yield first
        async for event in events:
            yield event
