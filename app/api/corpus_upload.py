"""A corpus upload: the raw request body (JSON Lines), read as it arrives and validated line by
line, so that a bad line or an oversized body is refused without holding the rest of it.

Every problem is an `ApiError` in the envelope: 413 `corpus_too_large` as soon as the body passes
the limit, 415 for a content type that is not JSON Lines or text, 422 `invalid_corpus` naming the
first bad line (`param` "line N"), 422 `empty_corpus` when no line holds a document, 400
`upload_interrupted` when the client goes away mid-body.
"""

from __future__ import annotations

from fastapi import Request
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from app.api.errors import ApiError
from app.ml.corpus import MAX_LINE_BYTES, CorpusError, Document, check_unicode, parse_line

CONTENT_TYPES = (
    "application/x-ndjson",
    "application/jsonl",
    "text/plain",
    "application/octet-stream",
)
EXAMPLE = (
    '{"text": "Those people are vermin.", "harmful_spans": [[17, 23]]}\n'
    '{"text": "Women cannot lead.", "id": "g-17"}\n'
    '"a bare string is a document without spans"\n'
)


class LineReader:
    """Documents from raw chunks: split on b"\\n", the partial last line kept for the next."""

    def __init__(self) -> None:
        self.documents: list[Document] = []
        self._pending = bytearray()
        self._line = 0  # lines completed so far

    def feed(self, chunk: bytes) -> None:
        self._pending += chunk
        start = 0
        while (end := self._pending.find(b"\n", start)) != -1:
            self._parse(bytes(self._pending[start:end]))
            start = end + 1
        del self._pending[:start]
        if len(self._pending) > MAX_LINE_BYTES:  # no need to wait for its end
            raise CorpusError(f"longer than {MAX_LINE_BYTES} bytes", self._line + 1)

    def finish(self) -> list[Document]:
        if self._pending:
            self._parse(bytes(self._pending))
            self._pending.clear()
        return self.documents

    def _parse(self, raw: bytes) -> None:
        self._line += 1
        document = parse_line(raw, self._line)
        if document is not None:
            try:
                self.documents.append(check_unicode(document))
            except CorpusError as exc:
                raise CorpusError(exc.reason, self._line) from None


async def read_corpus(request: Request, *, max_bytes: int) -> list[Document]:
    """The body's documents, validated as they arrive (parsing runs off the event loop)."""
    _check_content_type(request.headers.get("content-type"))
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise too_large(max_bytes)
    reader = LineReader()
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > max_bytes:
                raise too_large(max_bytes)
            if chunk:
                await run_in_threadpool(reader.feed, chunk)
        documents = reader.finish()
    except CorpusError as exc:
        raise ApiError(
            422, f"invalid corpus: {exc}", param=f"line {exc.line}", code="invalid_corpus"
        ) from None
    except ClientDisconnect:  # nobody reads the answer, but it is no server error either
        raise ApiError(
            400, "the upload ended before the whole body arrived", code="upload_interrupted"
        ) from None
    if not documents:
        raise ApiError(
            422,
            "the corpus holds no document: send JSON Lines, one document a line",
            code="empty_corpus",
        )
    return documents


def too_large(max_bytes: int) -> ApiError:
    return ApiError(
        413,
        f"the corpus is larger than this server's limit of {max_bytes:,} bytes "
        "(DETOX_CORPUS_MAX_BYTES)",
        code="corpus_too_large",
    )


def _check_content_type(header: str | None) -> None:
    if header is None:
        return
    media_type = header.split(";", 1)[0].strip().lower()
    if media_type not in CONTENT_TYPES:
        raise ApiError(
            415,
            f"unsupported content type {media_type!r} for a corpus: send JSON Lines as one of "
            + ", ".join(CONTENT_TYPES),
            param="Content-Type",
            code="unsupported_media_type",
        )
