"""How job failures are classified and written to the job row's `error` (the API's error shape).

- transient (database or broker unreachable, SQLite busy): the task is retried with backoff;
- bad input (the job's spec, its parent, its name): `invalid_request_error`, never retried;
- anything else: `internal_error`, logged with its traceback, not retried either (a bug or a
  broken model does not heal by running the same job again).
"""

from __future__ import annotations

from typing import Any

from kombu.exceptions import OperationalError as BrokerOperationalError
from sqlalchemy import exc as sa_exc

from app.job_spec import InvalidSpec

TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    sa_exc.OperationalError,
    sa_exc.InterfaceError,
    sa_exc.DisconnectionError,
    sa_exc.TimeoutError,  # no free connection in the pool
    BrokerOperationalError,
    ConnectionError,
)


class JobInputError(Exception):
    """The job cannot run as submitted; the message says why, `param` names the field."""

    def __init__(self, code: str, message: str, param: str | None = None):
        super().__init__(message)
        self.code, self.message, self.param = code, message, param


def job_error(type_: str, code: str, message: str, param: str | None = None) -> dict[str, Any]:
    """A job's `error` JSON: the same fields as the API's error envelope."""
    return {"type": type_, "code": code, "message": message, "param": param}


def invalid_request(exc: JobInputError | InvalidSpec) -> dict[str, Any]:
    return job_error("invalid_request_error", exc.code, exc.message, exc.param)


def internal_error(exc: BaseException) -> dict[str, Any]:
    message = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return job_error("internal_error", "internal_error", message[:2000])


def time_limit(limit_s: float) -> dict[str, Any]:
    return job_error(
        "timeout_error", "time_limit", f"the job ran longer than its time limit of {limit_s:g} s"
    )


def gave_up(retries: int, exc: BaseException) -> dict[str, Any]:
    return job_error(
        "service_unavailable_error",
        "transient_errors",
        f"gave up after {retries} retries of transient errors; the last was "
        f"{type(exc).__name__}: {exc}"[:2000],
    )
