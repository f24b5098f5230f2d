"""OpenAI-compatible generation and A/B: HTTP only (JSON, SSE or the error envelope).

The handlers live in `app.serving.handlers`; this router maps their typed errors to statuses and
cancels a request whose client went away, which frees its slot in the batch.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from typing import Annotated, TypeVar

from fastapi import APIRouter, Body, Depends, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel

from app.api.auth import Reader
from app.api.errors import INTERNAL, UNAVAILABLE, ApiError
from app.serving.errors import (
    EngineClosedError,
    EngineUnavailableError,
    InvalidParameterError,
    ModelLoadError,
    OverloadedError,
    PromptTooLargeError,
    PromptTooLongError,
    ServingError,
    UnknownModelError,
)
from app.serving.handlers import OpenAIHandlers
from app.serving.protocol import (
    AbRequest,
    AbResponse,
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ModelCard,
    ModelList,
)

router = APIRouter(prefix="/v1", tags=["generation"], dependencies=[Reader])

_MESSAGES = [{"role": "user", "content": "How do I pick a lock?"}]
COMPLETION_EXAMPLES = {
    "greedy": {"value": {"model": "latest", "prompt": "Once upon a time", "temperature": 0}},
    "stream": {"value": {"model": "base", "prompt": "Hello", "max_tokens": 32, "stream": True}},
}
CHAT_EXAMPLES = {
    "chat": {"value": {"model": "v3", "messages": _MESSAGES, "max_tokens": 64}},
    "stream": {"value": {"model": "latest", "messages": _MESSAGES, "stream": True}},
}
AB_EXAMPLES = {
    "ab": {"value": {"messages": _MESSAGES, "arms": ["base", "v3"], "max_tokens": 64}},
}
T = TypeVar("T")
_DISCONNECT_POLL_S = 0.25
OVERLOADED_RETRY_AFTER_S = 1
CLIENT_CLOSED = 499  # nginx's "client closed request"; nobody reads it


async def get_serving(request: Request) -> OpenAIHandlers:
    try:
        return await request.app.state.serving.get()
    except ServingError as exc:
        raise _api_error(exc, "model") from exc


ServingDep = Annotated[OpenAIHandlers, Depends(get_serving)]


class _ClientGone(Exception):
    pass


def _api_error(exc: ServingError, prompt_param: str) -> ApiError:
    if isinstance(exc, UnknownModelError):
        return ApiError(404, str(exc), param="model", code="model_not_found")
    if isinstance(exc, InvalidParameterError):
        return ApiError(400, str(exc), param=exc.param, code="invalid_parameter")
    if isinstance(exc, PromptTooLongError):
        return ApiError(400, str(exc), param=prompt_param, code="context_length_exceeded")
    if isinstance(exc, PromptTooLargeError):
        return ApiError(413, str(exc), param=prompt_param, code="prompt_too_large")
    if isinstance(exc, OverloadedError):
        return ApiError(
            503, str(exc), type=UNAVAILABLE, code="overloaded",
            headers={"Retry-After": str(OVERLOADED_RETRY_AFTER_S)},
        )  # fmt: skip
    if isinstance(exc, ModelLoadError):
        return ApiError(409, str(exc), param="model", code="model_not_servable")
    if isinstance(exc, EngineClosedError):
        return ApiError(503, str(exc), type=UNAVAILABLE, code="engine_closed")
    if isinstance(exc, EngineUnavailableError):
        return ApiError(503, str(exc), type=UNAVAILABLE, code="engine_unavailable")
    return ApiError(500, str(exc), type=INTERNAL, code="serving_error")


async def _run(request: Request, work: Awaitable[T], prompt_param: str) -> T:
    """`work`'s result; cancelled when the client disconnects first. Serving errors -> ApiError."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=_DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                raise _ClientGone
    except ServingError as exc:
        raise _api_error(exc, prompt_param) from exc
    finally:
        if not task.done():
            task.cancel()


def _respond(result: BaseModel | AsyncIterator[str]) -> Response:
    if isinstance(result, BaseModel):
        return JSONResponse(result.model_dump(mode="json"))
    return StreamingResponse(
        result,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _answer(request: Request, work: Awaitable, prompt_param: str) -> Response:
    try:
        return _respond(await _run(request, work, prompt_param))
    except _ClientGone:
        return Response(status_code=CLIENT_CLOSED)


@router.get("/models", response_model=ModelList)
async def list_models(serving: ServingDep) -> ModelList:
    """The base model and every live version (with its `parent`)."""
    return serving.models()


@router.get("/models/{name}", response_model=ModelCard)
async def retrieve_model(name: str, serving: ServingDep) -> ModelCard:
    """One model: `base`, a live version, or `latest` (answered as the version it names now);
    404 with `param: "model"` for any other name."""
    try:
        return await asyncio.to_thread(serving.model, name)
    except ServingError as exc:
        raise _api_error(exc, "model") from exc


@router.post(
    "/completions",
    response_model=Completion,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def completions(
    body: Annotated[CompletionRequest, Body(openapi_examples=COMPLETION_EXAMPLES)],
    request: Request,
    serving: ServingDep,
) -> Response:
    return await _answer(request, serving.completion(body), "prompt")


@router.post(
    "/chat/completions",
    response_model=ChatCompletion,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def chat_completions(
    body: Annotated[ChatCompletionRequest, Body(openapi_examples=CHAT_EXAMPLES)],
    request: Request,
    serving: ServingDep,
) -> Response:
    return await _answer(request, serving.chat(body), "messages")


@router.post("/ab", response_model=AbResponse)
async def ab(
    body: Annotated[AbRequest, Body(openapi_examples=AB_EXAMPLES)],
    request: Request,
    serving: ServingDep,
) -> Response:
    """One prompt through every arm, in the same batch; each arm judged."""
    param = "messages" if body.messages is not None else "prompt"
    return await _answer(request, serving.ab(body), param)
