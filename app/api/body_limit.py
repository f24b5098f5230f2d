"""A limit on request bodies, as ASGI middleware: a declared `Content-Length` over the limit is
refused before anything is read, and a body that grows past it while streaming in is cut off.
Either way the answer is 413 in the error envelope. Corpus uploads (`POST /v1/corpora`) are left
to their own, larger limit (`app.api.corpus_upload`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.errors import INVALID_REQUEST, error_response


class _TooLarge(Exception):
    pass


class BodyLimit:
    def __init__(self, app: ASGIApp, *, max_bytes: int, exempt: Callable[[Scope], bool]):
        self.app = app
        self.max_bytes = max_bytes
        self.exempt = exempt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.exempt(scope):
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        received = 0
        exceeded = refused = started = False

        async def limited_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    exceeded = True
                    raise _TooLarge
            return message

        async def guarded_send(message: Message) -> None:
            # Once the body went over, whatever the app answers (a framework may turn the
            # interrupted read into its own 400) is replaced by the 413.
            nonlocal refused, started
            if not exceeded:
                started = started or message["type"] == "http.response.start"
                await send(message)
            elif started:  # the answer had begun before the body went over: nothing to fix
                raise _TooLarge
            elif not refused:
                refused = True
                await self._refuse(scope, receive, send)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _TooLarge:
            if started:
                raise
            if not refused:
                refused = True
                await self._refuse(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(
            413,
            f"the request body is larger than this server's limit of {self.max_bytes:,} bytes "
            "(DETOX_MAX_REQUEST_BYTES)",
            INVALID_REQUEST,
            code="request_too_large",
            headers={"Connection": "close"},  # the rest of the body is not read
        )
        await response(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            text = value.decode("latin-1").strip()
            return int(text) if text.isdigit() else None
    return None


def is_corpus_upload(scope: dict[str, Any]) -> bool:
    return scope.get("method") == "POST" and scope.get("path", "").rstrip("/") == "/v1/corpora"
