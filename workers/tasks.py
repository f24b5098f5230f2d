"""The Celery task: job id in, `execute_job` out. Only the worker process imports this module.

Delivery settings: late acks and reject-on-worker-lost (a killed worker's task is redelivered),
no stored result (the job row is the result), retries only for transient errors, with
exponential backoff capped by settings; non-retryable errors are already on the job row when
`execute_job` returns. The time limits come from the app's configuration (`create_app`).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from dataclasses import dataclass

from celery import Task, shared_task
from sqlalchemy.orm import Session, sessionmaker

from app.settings import Settings, get_settings
from app.store import crud, make_engine, make_sessionmaker
from workers import errors
from workers.celery_app import RUN_JOB
from workers.errors import TRANSIENT_ERRORS
from workers.execution import execute_job
from workers.runtime import Runtime

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerContext:
    """What every task of this process shares."""

    settings: Settings
    session_factory: sessionmaker[Session]
    runtime: Runtime
    name: str


_context: WorkerContext | None = None
_context_lock = threading.Lock()


def worker_name() -> str:
    return f"detox-{os.getpid()}@{socket.gethostname()}"


def build_context(settings: Settings) -> WorkerContext:
    engine = make_engine(settings.resolved_database_url())
    return WorkerContext(settings, make_sessionmaker(engine), Runtime(settings), worker_name())


def install_context(context: WorkerContext | None) -> None:
    """Make `context` the one tasks use (`run_worker` does this before consuming); None forgets
    it (tests)."""
    global _context
    with _context_lock:
        _context = context


def current_context() -> WorkerContext:
    """The installed context, or one built from the environment's settings (a worker started
    with the plain `celery worker` command)."""
    global _context
    with _context_lock:
        if _context is None:
            _context = build_context(get_settings())
        return _context


@shared_task(
    name=RUN_JOB, bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True
)
def run_job(self: Task, job_id: str) -> str:
    """Run the job; transient errors are retried here (not with `autoretry_for`, which fixes the
    backoff when the module is imported, before the worker's settings are known)."""
    context = current_context()
    settings = context.settings
    try:
        return execute_job(
            job_id,
            session_factory=context.session_factory,
            runtime=context.runtime,
            settings=settings,
            worker_name=context.name,
        )
    except TRANSIENT_ERRORS as exc:
        retries = self.request.retries
        if retries >= settings.job_max_retries:
            _give_up(context, job_id, retries, exc)
            raise
        countdown = min(settings.job_retry_backoff_max_s, settings.job_retry_backoff_s * 2**retries)
        log.warning("job %s: retry %d in %.1f s after %s", job_id, retries + 1, countdown, exc)
        raise self.retry(
            exc=exc, countdown=countdown, max_retries=settings.job_max_retries
        ) from exc


def _give_up(context: WorkerContext, job_id: str, retries: int, exc: BaseException) -> None:
    """Retries exhausted: fail the job if it still waits for this task (best effort)."""
    try:
        with context.session_factory() as session:
            job = crud.get_job(session=session, job_id=job_id)
            if job.status == "queued":  # the claim was given back; fenced to that attempt count
                crud.finish_job_failed(
                    session=session,
                    job_id=job_id,
                    error=errors.gave_up(retries, exc),
                    attempt=job.attempts,
                )
    except Exception as second:
        log.error("job %s: could not record giving up (%s); the reaper will see it", job_id, second)
