"""Logging for the service processes: one line per record, JSON by default, each carrying the
request id (API) or the job id (worker) of the work it belongs to.

The ids live in context variables: `app.api.observability` sets the request id for each HTTP
request (from `X-Request-ID`, or a new one), `workers.execution` sets the job id for each job, and
`ContextFilter` copies both onto every record. The JSON formatter is python-json-logger's.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from pythonjsonlogger.json import JsonFormatter

request_id: ContextVar[str | None] = ContextVar("request_id", default=None)
job_id: ContextVar[str | None] = ContextVar("job_id", default=None)

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
JSON_FIELDS = "%(asctime)s %(levelname)s %(name)s %(message)s"
RENAMED = {"asctime": "time", "levelname": "level", "name": "logger"}
ISO_TIME = "%Y-%m-%dT%H:%M:%S%z"


class ContextFilter(logging.Filter):
    """Puts the current request and job ids on every record (None outside of one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        record.job_id = job_id.get()
        record.__dict__.pop("color_message", None)  # uvicorn's ANSI-coloured copy of the message
        return True


def configure_logging(fmt: str = "json", level: str = "INFO") -> None:
    """One stderr handler on the root logger, in `fmt` ("json" or "text"); replaces any other."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(ContextFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter(JSON_FIELDS, rename_fields=RENAMED, datefmt=ISO_TIME))
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level.upper())
    logging.captureWarnings(True)  # warnings become records (py.warnings), formatted alike
    # httpx logs every request at INFO: the vLLM engine's polling would be most of the log.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, root.level))
    if fmt == "json":
        _quiet_progress_bars()


def _quiet_progress_bars() -> None:
    """Progress bars are not log lines. transformers and huggingface_hub read this variable when
    first imported; transformers, if already imported (a worker), is told directly."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    # uvicorn and celery log through the root logger (the API logs its own access lines).
    for name in ("uvicorn", "uvicorn.error", "celery"):
        logging.getLogger(name).handlers = []
        logging.getLogger(name).propagate = True


@contextmanager
def job_context(job: str) -> Iterator[None]:
    """Records logged inside carry `job_id`."""
    token = job_id.set(job)
    try:
        yield
    finally:
        job_id.reset(token)
