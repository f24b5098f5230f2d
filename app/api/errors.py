"""One error envelope, `{"error": {"message", "type", "param", "code"}}`, built by one helper and
emitted by every exception handler (validation, HTTP, store, broker, and anything unexpected)."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as TimeoutError_  # the connection pool ran dry
from starlette.exceptions import HTTPException

from app.store import errors as store_errors
from app.validation import field_path, first_problem, problem_message

log = logging.getLogger(__name__)

# `type` values, OpenAI-style: what kind of failure, for clients that branch on it.
INVALID_REQUEST = "invalid_request_error"
NOT_FOUND = "not_found_error"
CONFLICT = "conflict_error"
UNAVAILABLE = "service_unavailable_error"
INTERNAL = "internal_error"

_TYPE_BY_STATUS = {404: NOT_FOUND, 409: CONFLICT, 503: UNAVAILABLE}
DATABASE_RETRY_AFTER_S = 2


def error_body(
    message: str, type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(
    status: int,
    message: str,
    type: str,
    param: str | None = None,
    code: str | None = None,
    *,
    extra: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """The one way this API answers an error; `extra` adds top-level keys beside `error`."""
    content = error_body(message, type, param, code) | (extra or {})
    return JSONResponse(content, status_code=status, headers=headers)


class ApiError(Exception):
    """Raised by routes for an error whose status, param and code they know best."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _TYPE_BY_STATUS.get(status, INVALID_REQUEST)
        self.param = param
        self.code = code
        self.headers = dict(headers or {})
        if status == 401:
            self.headers.setdefault("WWW-Authenticate", "Bearer")


def _status_type(status: int) -> str:
    if status in _TYPE_BY_STATUS:
        return _TYPE_BY_STATUS[status]
    return INTERNAL if status >= 500 else INVALID_REQUEST


# The OpenAI-compatible routes answer as OpenAI does: 400 for a parameter the server does not
# take (unsupported or unknown) and for a value of the wrong JSON type; other problems are 422.
OPENAI_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})


async def _on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = list(exc.errors())
    first = first_problem(errors)
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if tuple(first.get("loc", ())) == ("body",) and not _is_json(media):
        got = f"got {media[:60]!r}" if media else "none was sent"
        return error_response(
            415,
            f"the body must be JSON: send `Content-Type: application/json` ({got})",
            INVALID_REQUEST,
            code="unsupported_media_type",
        )
    param = field_path(first.get("loc", ()))
    code = first.get("type")
    if code == "json_invalid":
        param = None
    message = problem_message(first, param)
    status = 422
    if request.url.path in OPENAI_PATHS:
        if code == "extra_forbidden":
            code, message = "unsupported_parameter", f"{param}: unknown parameter"
        if code in ("unsupported_parameter", "unsupported_content") or str(code).endswith("_type"):
            status = 400
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more)"
    return error_response(status, message, INVALID_REQUEST, param, code)


def _is_json(media: str) -> bool:
    return media == "application/json" or media.endswith("+json")


async def _on_api_error(_request: Request, exc: ApiError) -> JSONResponse:
    return error_response(
        exc.status, exc.message, exc.type, exc.param, exc.code, headers=exc.headers or None
    )


# FastAPI's answer when parsing the body raised (JSON nested past Python's recursion limit).
_UNPARSABLE = "There was an error parsing the body"


async def _on_http(_request: Request, exc: HTTPException) -> JSONResponse:
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    headers = dict(exc.headers) if exc.headers else None
    code = None
    if exc.status_code == 400 and message == _UNPARSABLE:
        message = "the body could not be parsed: JSON nested too deeply, or not JSON at all"
        code = "body_unparsable"
    return error_response(
        exc.status_code, message, _status_type(exc.status_code), code=code, headers=headers
    )


_STORE_ERRORS: dict[type[Exception], tuple[int, str, str]] = {
    store_errors.NotFound: (404, NOT_FOUND, "not_found"),
    store_errors.DuplicateVersionName: (409, CONFLICT, "duplicate_version_name"),
    store_errors.VersionHasChildren: (409, CONFLICT, "version_has_children"),
    store_errors.VersionInExperiment: (409, CONFLICT, "version_in_experiment"),
    store_errors.InvalidCursor: (400, INVALID_REQUEST, "invalid_cursor"),
    store_errors.InvalidVersionName: (422, INVALID_REQUEST, "invalid_version_name"),
    store_errors.InvalidCorpusName: (422, INVALID_REQUEST, "invalid_corpus_name"),
    store_errors.DuplicateCorpusName: (409, CONFLICT, "duplicate_corpus_name"),
    store_errors.CorpusInUse: (409, CONFLICT, "corpus_in_use"),
    store_errors.DuplicateExperimentName: (409, CONFLICT, "duplicate_experiment_name"),
    store_errors.ExperimentStopped: (409, CONFLICT, "experiment_stopped"),
}
_STORE_PARAMS: dict[type[Exception], str] = {
    store_errors.InvalidCursor: "cursor",
    store_errors.DuplicateVersionName: "name",
    store_errors.InvalidVersionName: "name",
    store_errors.InvalidCorpusName: "name",
    store_errors.DuplicateCorpusName: "name",
    store_errors.DuplicateExperimentName: "name",
}


async def _on_store(_request: Request, exc: Exception) -> JSONResponse:
    for cls, (status, type_, code) in _STORE_ERRORS.items():
        if isinstance(exc, cls):
            return error_response(status, str(exc), type_, _STORE_PARAMS.get(cls), code)
    return await _on_unexpected(_request, exc)


async def _on_broker(_request: Request, exc: Exception) -> JSONResponse:
    message = f"the job queue is unavailable: {exc}"
    return error_response(503, message, UNAVAILABLE, code="broker_unavailable")


async def _on_database(request: Request, exc: Exception) -> JSONResponse:
    """The database is unreachable, refused the connection or has no connection to spare (an
    OperationalError also wraps psycopg's AdminShutdown and friends): the client may retry."""
    log.warning("database unavailable on %s %s: %s", request.method, request.url.path, exc)
    return error_response(
        503,
        "the database is unavailable; retry shortly",
        UNAVAILABLE,
        code="database_unavailable",
        headers={"Retry-After": str(DATABASE_RETRY_AFTER_S)},
    )


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal server error", INTERNAL, code="internal_error")


def install_error_handlers(app: FastAPI, *, broker_error: type[Exception]) -> None:
    """Every error this app can answer goes through `error_response`."""
    app.add_exception_handler(RequestValidationError, _on_validation)  # type: ignore[arg-type]
    app.add_exception_handler(ApiError, _on_api_error)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, _on_http)  # type: ignore[arg-type]
    for cls in _STORE_ERRORS:
        app.add_exception_handler(cls, _on_store)
    app.add_exception_handler(broker_error, _on_broker)
    for cls in (OperationalError, InterfaceError, DisconnectionError, TimeoutError_):
        app.add_exception_handler(cls, _on_database)
    app.add_exception_handler(Exception, _on_unexpected)
