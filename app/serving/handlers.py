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
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import aclosing
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
        def respond(rid: str, created: int, target: Target, results, usage: Usage) -> Completion:
            return Completion(
                id=rid,
                created=created,
                model=target.name,
                choices=[CompletionChoice(
                    index=index, text=result.text, finish_reason=result.finish_reason,
                    logprobs=self._completion_logprobs(request, result.logprobs),
                ) for index, result in enumerate(results)],
                usage=usage,
            )  # fmt: skip

        prompts = request.prompts()

        def encode() -> list[list[int]]:
            return [self._prompt_ids(p) for p in prompts]

        text = prompts[0] if isinstance(prompts[0], str) else ""
        return await self._serve(request, encode, text, "cmpl", self._completion_stream, respond)

    async def chat(self, request: ChatCompletionRequest) -> ChatCompletion | AsyncIterator[str]:
        def respond(rid: str, created: int, target: Target, results, usage) -> ChatCompletion:
            choices = [
                ChatChoice(
                    index=index,
                    message=AssistantMessage(content=result.text),
                    finish_reason=result.finish_reason,
                    logprobs=self._chat_logprobs(request, result.logprobs),
                )
                for index, result in enumerate(results)
            ]
            return ChatCompletion(
                id=rid, created=created, model=target.name, choices=choices, usage=usage
            )

        def encode() -> list[list[int]]:
            return [self.engine.encode_chat(request.plain_messages())]

        prompt = request.last_user_text()
        return await self._serve(request, encode, prompt, "chatcmpl", self._chat_stream, respond)

    def _prompt_ids(self, prompt: str | list[int]) -> list[int]:
        """A completion prompt's token ids: its text encoded, or the ids it gave (checked)."""
        if isinstance(prompt, str):
            return self.engine.encode_text(prompt)
        self._check_vocabulary(prompt, "prompt")
        return list(prompt)

    def _top(self, entry: TokenLogprobEvent) -> list[tuple[str, float]]:
        return [(self.engine.token_text(t), lp) for t, lp in entry.top]

    def _completion_logprobs(
        self, request: CompletionRequest, entries: Sequence[TokenLogprobEvent], at: int = 0
    ) -> CompletionLogprobs | None:
        """The legacy shape; `at`: the text offset of the first token (in a stream, the length
        of the answer's text before it)."""
        if request.wanted_logprobs() is None:
            return None
        tokens = [self.engine.token_text(e.token) for e in entries]
        offsets = []
        for token in tokens:
            offsets.append(at)
            at += len(token)
        return CompletionLogprobs(
            tokens=tokens,
            token_logprobs=[e.logprob for e in entries],
            top_logprobs=[dict(self._top(e)) for e in entries] if request.logprobs else None,
            text_offset=offsets,
        )

    def _chat_logprobs(
        self, request: ChatCompletionRequest, entries: Sequence[TokenLogprobEvent]
    ) -> ChatLogprobs | None:
        if request.wanted_logprobs() is None:
            return None

        def utf8(text: str) -> list[int]:
            return list(text.encode("utf-8", errors="replace"))

        content = []
        for entry in entries:
            text = self.engine.token_text(entry.token)
            top = [TopLogprob(token=t, logprob=lp, bytes=utf8(t)) for t, lp in self._top(entry)]
            content.append(
                TokenLogprob(token=text, logprob=entry.logprob, bytes=utf8(text), top_logprobs=top)
            )
        return ChatLogprobs(content=content)

    async def _serve(self, request, encode, prompt: str, id_prefix: str, stream, respond):
        """Both endpoints' steps: route and resolve the model, tokenise, then stream the events
        (`stream`) or wait for the whole results (`respond`): `n` answers to each prompt, in
        that order; a watched route hears of its one answer."""
        start = time.perf_counter()
        route, target, prompts = await asyncio.to_thread(self._prepare, request, encode)
        self._check_logit_bias(request)
        jobs = [
            (ids, target, request.to_sampling_params(budget, choice))
            for ids in prompts
            for budget in [self.engine.token_budget(ids, request.requested_tokens())]
            for choice in range(request.n)
        ]
        if route is not None and len(jobs) > 1:
            raise InvalidParameterError(
                f"{request.model} answers one prompt with one choice (n=1)", "n"
            )
        rid, created = new_id(id_prefix), now()
        served = self._watcher(route, rid, prompt, start)
        if request.stream:
            events = await self._started_all(jobs)
            return stream(request, rid, created, target, served.indexed(events))
        if len(jobs) == 1:
            results = [await self.engine.complete(*jobs[0])]
        else:
            results = await self.engine.complete_together(jobs)
        served.finished(results[0])
        return respond(rid, created, target, results, _usage(dict(enumerate(results)), request.n))

    def _check_logit_bias(self, request: CompletionRequest | ChatCompletionRequest) -> None:
        self._check_vocabulary([int(t) for t in request.logit_bias or {}], "logit_bias")

    def _check_vocabulary(self, tokens: Sequence[int], param: str) -> None:
        """Refuse token ids the model does not have (400 naming `param`)."""
        vocab = getattr(self.engine, "vocab_size", None)
        beyond = [t for t in tokens if vocab is not None and t >= vocab]
        if beyond:
            raise InvalidParameterError(
                f"{param}: token {beyond[0]} is beyond the model's vocabulary (0-{vocab - 1})",
                param,
            )

    def _prepare(
        self,
        request: CompletionRequest | ChatCompletionRequest,
        encode: Callable[[], list[list[int]]],
    ) -> tuple[Route | None, Target, list[list[int]]]:
        """The request's route (for a routed model such as `exp:<name>`), the resolved model and
        each prompt's ids. Blocking: may read the store and load a version."""
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

    async def _started_all(self, jobs) -> list[AsyncIterator[Event]]:
        """Every job's stream started (`_started`), at once; if one cannot start, none stays."""
        started = await asyncio.gather(
            *(self._started(*job) for job in jobs), return_exceptions=True
        )
        failed = [r for r in started if isinstance(r, BaseException)]
        if failed:
            for events in started:
                if not isinstance(events, BaseException):
                    await events.aclose()
            raise failed[0]
        return started

    def _completion_stream(self, request, rid, created, target, events) -> AsyncIterator[str]:
        offsets: dict[int, int] = {}  # each answer's token text so far, for `text_offset`

        def chunk(index: int, text: str, finish: str | None, logprobs=()) -> Completion:
            at = offsets.get(index, 0)
            scored = self._completion_logprobs(request, logprobs, at) if logprobs else None
            offsets[index] = at + sum(len(t) for t in scored.tokens) if scored else at
            choice = CompletionChoice(index=index, text=text, finish_reason=finish, logprobs=scored)
            return Completion(id=rid, created=created, model=target.name, choices=[choice])

        def usage_chunk(usage: Usage) -> Completion:
            return Completion(id=rid, created=created, model=target.name, choices=[], usage=usage)

        return self._events(request, events, chunk, usage_chunk)

    def _chat_stream(self, request, rid, created, target, events) -> AsyncIterator[str]:
        begun: set[int] = set()  # choices whose first chunk (with the role) went out

        def chunk(index: int, text: str, finish: str | None, logprobs=()) -> ChatCompletionChunk:
            delta = ChatDelta(role=None if index in begun else "assistant", content=text)
            if finish is not None and not text:
                delta = ChatDelta()
            begun.add(index)
            scored = self._chat_logprobs(request, logprobs) if logprobs else None
            choice = ChatChunkChoice(
                index=index, delta=delta, finish_reason=finish, logprobs=scored
            )
            return ChatCompletionChunk(id=rid, created=created, model=target.name, choices=[choice])

        def usage_chunk(usage: Usage) -> ChatCompletionChunk:
            return ChatCompletionChunk(
                id=rid, created=created, model=target.name, choices=[], usage=usage
            )

        return self._events(request, events, chunk, usage_chunk)

    async def _events(self, request, events, chunk, usage_chunk) -> AsyncIterator[str]:
        # aclosing: when the client goes away, the engine's streams are closed at once, which
        # cancels the requests and frees their slots in the batch.
        async with aclosing(events):
            async for line in self._lines(request, events, chunk, usage_chunk):
                yield line
        yield DONE

    async def _lines(self, request, events, chunk, usage_chunk) -> AsyncIterator[str]:
        """SSE lines of `(choice index, event)` pairs; the usage of every answer last, once all
        have finished (`stream_options.include_usage`)."""
        finished: dict[int, Finished] = {}
        async for index, event in events:
            if isinstance(event, TextDelta):
                yield sse(chunk(index, event.text, None, event.logprobs))
            elif isinstance(event, Finished):
                finished[index] = event
                yield sse(chunk(index, "", event.finish_reason))
            elif isinstance(event, Failed):
                message = f"generation failed: {event.error}"
                yield sse({"error": {"message": message, "type": "internal_error",
                                     "param": None, "code": "generation_failed"}})  # fmt: skip
        if request.include_usage and finished:
            yield sse(usage_chunk(_usage(finished, request.n)))

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

    def indexed(self, streams: list[AsyncIterator[Event]]) -> AsyncIterator[tuple[int, Event]]:
        """The streams' events as (index, event) as they come; a watched route has one stream."""
        if self._traffic is not None:
            return _merged([self._watched(streams[0])])
        return _merged(streams)

    async def _watched(self, events: AsyncIterator[Event]) -> AsyncIterator[Event]:
        async with aclosing(events):
            async for event in events:
                if isinstance(event, Finished):
                    self.finished(event)
                yield event


def _usage(answers: dict[int, Finished], n: int) -> Usage:
    """A request's usage from its answers by index (`n` to a prompt, prompt by prompt): each
    prompt counted once, every answer's tokens."""
    prompts = {index // n: answer.prompt_tokens for index, answer in answers.items()}
    completion = sum(answer.completion_tokens for answer in answers.values())
    return Usage.of(sum(prompts.values()), completion)


async def _merged(
    streams: list[AsyncIterator[Event]],
) -> AsyncIterator[tuple[int, Event]]:
    """Every stream's events as (its index, event), in the order they arrive; closing this
    closes them all (which cancels their requests)."""
    if len(streams) == 1:  # the usual request: no task and queue hop for every token
        async with aclosing(streams[0]):
            async for event in streams[0]:
                yield 0, event
        return
    arrived: asyncio.Queue[tuple[int, Event | None]] = asyncio.Queue()

    async def pump(index: int, events: AsyncIterator[Event]) -> None:
        try:
            async with aclosing(events):
                async for event in events:
                    arrived.put_nowait((index, event))
        except Exception as exc:  # delivered as the answer's failure
            arrived.put_nowait((index, Failed(exc)))
        finally:
            arrived.put_nowait((index, None))

    pumps = [asyncio.create_task(pump(i, events)) for i, events in enumerate(streams)]
    try:
        open_streams = len(streams)
        while open_streams:
            index, event = await arrived.get()
            if event is None:
                open_streams -= 1
            else:
                yield index, event
    finally:
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)


async def _prepended(first: Event, events: AsyncIterator[Event]) -> AsyncIterator[Event]:
    """`first`, then the rest of `events` (closed with this generator)."""
    async with aclosing(events):
        yield first
        async for event in events:
            yield event
