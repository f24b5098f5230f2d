"""Jobs: submission, the worker's claim/progress/finish protocol, cancellation, stale detection.

Every write function commits its own transaction. State changes are conditional UPDATEs
(`... WHERE status = 'running'`), so concurrent callers (two workers, the API and a worker, the
stale sweeper) can never both win: the loser sees no row changed and gets None/False back. The
optional `attempt` argument fences a worker to its own claim: after a stale job was requeued and
claimed again, the first worker's late writes change nothing.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import uuid
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy import ColumnElement, and_, false, func, or_, select, update
from sqlalchemy.orm import Session

from app.store._rows import MAX_PAGE, add_unique
from app.store._types import utcnow
from app.store.errors import InvalidCursor, NotFound
from app.store.models import JOB_KINDS, JOB_STATUSES, Job

ACTIVE_STATUSES = ("queued", "running")
UNSENT = "broker_unavailable"  # the error code of a job the broker never received


class JobPage(NamedTuple):
    items: list[Job]
    next_cursor: str | None  # None on the last page


def create_job(
    *,
    session: Session,
    kind: str,
    spec: dict[str, Any],
    parent_version_id: int | None = None,
    idempotency_key: str | None = None,
    request_hash: str | None = None,
    api_key_id: int | None = None,
) -> tuple[Job, bool]:
    """Insert a `queued` job; returns (job, created).

    A repeated `idempotency_key` returns the existing job and created=False (even when two requests
    race: the unique constraint decides, the loser rolls back and reads the winner's row). Only
    when created is True should the caller enqueue the job.
    """
    if kind not in JOB_KINDS:
        raise ValueError(f"unknown job kind {kind!r}; expected one of {JOB_KINDS}")
    if idempotency_key is not None:
        existing = _by_idempotency_key(session, idempotency_key)
        if existing is not None:
            return existing, False
    job = Job(
        id=str(uuid.uuid4()),
        kind=kind,
        status="queued",
        progress=0.0,
        attempts=0,
        cancel_requested=False,
        spec=spec,
        parent_version_id=parent_version_id,
        idempotency_key=idempotency_key,
        request_hash=request_hash,
        api_key_id=api_key_id,
    )

    def clash() -> Exception | None:
        existing = _by_idempotency_key(session, idempotency_key) if idempotency_key else None
        return None if existing is None else _Replay(existing)

    try:
        add_unique(session, job, clash=clash)
    except _Replay as replay:
        return replay.job, False
    return job, True


class _Replay(Exception):
    """The idempotency key is taken (by a concurrent request): its job is the answer."""

    def __init__(self, job: Job):
        self.job = job


def find_job_by_idempotency_key(*, session: Session, key: str) -> Job | None:
    """The job submitted with this idempotency key, or None (a retry checks this first)."""
    return _by_idempotency_key(session, key)


def _by_idempotency_key(session: Session, key: str) -> Job | None:
    return session.scalars(select(Job).where(Job.idempotency_key == key)).one_or_none()


def get_job(*, session: Session, job_id: str) -> Job:
    """The job, freshly read (raises NotFound)."""
    job = session.get(Job, job_id, populate_existing=True)
    if job is None:
        raise NotFound(f"no job {job_id!r}")
    return job


def list_jobs(
    *, session: Session, status: str | None = None, limit: int = 50, cursor: str | None = None
) -> JobPage:
    """Newest first (created_at, then id, descending); pass `next_cursor` back for the next page."""
    if not 1 <= limit <= MAX_PAGE:
        raise ValueError(f"limit must be within 1..{MAX_PAGE}, not {limit}")
    query = select(Job)
    if status is not None:
        query = query.where(Job.status == _check_status(status))
    if cursor is not None:
        created_at, job_id = decode_cursor(cursor)
        query = query.where(
            or_(Job.created_at < created_at, and_(Job.created_at == created_at, Job.id < job_id))
        )
    query = query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)
    items = list(session.scalars(query).unique())
    more = len(items) > limit
    items = items[:limit]
    return JobPage(items, encode_cursor(items[-1]) if more else None)


def count_jobs(*, session: Session, status: str | None = None) -> int:
    query = select(func.count()).select_from(Job)
    if status is not None:
        query = query.where(Job.status == _check_status(status))
    return session.scalar(query) or 0


def count_active_jobs(*, session: Session, api_key_id: int | None) -> int:
    """Queued or running jobs submitted with this key (None: those without a key)."""
    owner = Job.api_key_id.is_(None) if api_key_id is None else Job.api_key_id == api_key_id
    query = select(func.count()).select_from(Job).where(owner, Job.status.in_(ACTIVE_STATUSES))
    return int(session.scalar(query) or 0)


def _check_status(status: str) -> str:
    if status not in JOB_STATUSES:
        raise ValueError(f"unknown job status {status!r}; expected one of {JOB_STATUSES}")
    return status


def encode_cursor(job: Job) -> str:
    raw = json.dumps([job.created_at.isoformat(), job.id], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        stamp, job_id = json.loads(raw)
        created_at = datetime.fromisoformat(stamp)
    except (binascii.Error, UnicodeDecodeError, ValueError, TypeError) as exc:
        raise InvalidCursor(f"invalid cursor {cursor[:40]!r}") from exc
    if not isinstance(job_id, str) or created_at.tzinfo is None:
        raise InvalidCursor(f"invalid cursor {cursor[:40]!r}")
    return created_at, job_id


def claim_job(
    *,
    session: Session,
    job_id: str,
    worker: str,
    steal_after: timedelta | None = None,
    max_attempts: int | None = None,
) -> Job | None:
    """Atomically turn a `queued` job into `running` for `worker` (attempts + 1); else None.

    With `steal_after`, a `running` job whose heartbeat is older than that is claimable too (a
    redelivered task whose first worker died). With `max_attempts`, a claimable job that has used
    them all is marked `failed` instead, and None is returned. A job with a cancel request is
    never claimed.
    """
    now = utcnow()
    claimable = _claimable(job_id, now, steal_after)
    under_cap = [Job.attempts < max_attempts] if max_attempts is not None else []
    claimed = session.execute(
        update(Job)
        .where(*claimable, *under_cap)
        .values(
            status="running",
            attempts=Job.attempts + 1,
            worker=worker,
            stage="claimed",
            progress=0.0,
            started_at=now,
            heartbeat_at=now,
            error=None,
        )
        .execution_options(synchronize_session=False)
    )
    if claimed.rowcount == 1:
        session.commit()
        return get_job(session=session, job_id=job_id)
    if max_attempts is not None:
        session.execute(
            update(Job)
            .where(*claimable, Job.attempts >= max_attempts)
            .values(status="failed", finished_at=now, error=attempts_exhausted(max_attempts))
            .execution_options(synchronize_session=False)
        )
    session.commit()
    return None


def _claimable(job_id: str, now: datetime, steal_after: timedelta | None) -> list[Any]:
    state: ColumnElement[bool] = Job.status == "queued"
    if steal_after is not None:
        stale = and_(Job.status == "running", Job.heartbeat_at < now - steal_after)
        state = or_(state, stale)
    return [Job.id == job_id, Job.cancel_requested == false(), state]


def attempts_exhausted(max_attempts: int) -> dict[str, Any]:
    return {
        "type": "worker_lost",
        "code": "attempts_exhausted",
        "message": f"the job's worker stopped responding {max_attempts} times; giving up",
    }


def _running(job_id: str, attempt: int | None) -> list[Any]:
    fence = [Job.attempts == attempt] if attempt is not None else []
    return [Job.id == job_id, Job.status == "running", *fence]


def _conditional_update(session: Session, where: list[Any], **values: Any) -> bool:
    result = session.execute(
        update(Job).where(*where).values(**values).execution_options(synchronize_session=False)
    )
    session.commit()
    return result.rowcount == 1


def heartbeat(*, session: Session, job_id: str, attempt: int | None = None) -> bool:
    """Record that the worker is alive; False when the job is no longer running (for it)."""
    return _conditional_update(session, _running(job_id, attempt), heartbeat_at=utcnow())


def update_progress(
    *, session: Session, job_id: str, stage: str, progress: float, attempt: int | None = None
) -> bool:
    """Set stage and progress (clamped to 0..1) and bump the heartbeat; only while running."""
    if math.isnan(progress):
        raise ValueError("progress is NaN")
    progress = min(1.0, max(0.0, float(progress)))
    return _conditional_update(
        session,
        _running(job_id, attempt),
        stage=stage[:64],
        progress=progress,
        heartbeat_at=utcnow(),
    )


def release_job(*, session: Session, job_id: str, attempt: int) -> bool:
    """Give a claim back after a transient failure (the task will be retried): running (in
    `attempt`) -> `queued`, and the claim does not count against the attempt cap. False when the
    job is no longer running in that attempt."""
    return _conditional_update(
        session,
        _running(job_id, attempt),
        status="queued",
        stage="retrying",
        progress=0.0,
        worker=None,
        attempts=Job.attempts - 1,
    )


def request_cancel(*, session: Session, job_id: str) -> Job:
    """A queued job is `cancelled` at once; a running one gets `cancel_requested` for its worker
    to honour between steps; a finished job is left as it is. Returns the job as it now is."""
    now = utcnow()
    queued = [Job.id == job_id, Job.status == "queued"]
    if not _conditional_update(
        session, queued, status="cancelled", cancel_requested=True, finished_at=now
    ):
        running = [Job.id == job_id, Job.status == "running"]
        _conditional_update(session, running, cancel_requested=True)
    return get_job(session=session, job_id=job_id)


def is_cancel_requested(*, session: Session, job_id: str) -> bool:
    value = session.scalar(select(Job.cancel_requested).where(Job.id == job_id))
    if value is None:
        raise NotFound(f"no job {job_id!r}")
    return bool(value)


def _finish(session: Session, job_id: str, attempt: int | None, **values: Any) -> bool:
    fence = [Job.attempts == attempt] if attempt is not None else []
    active = [Job.id == job_id, Job.status.in_(ACTIVE_STATUSES), *fence]
    now = utcnow()
    return _conditional_update(session, active, finished_at=now, heartbeat_at=now, **values)


def finish_job_failed(
    *, session: Session, job_id: str, error: dict[str, Any], attempt: int | None = None
) -> bool:
    """queued/running -> `failed` with `error` (JSON); False if the job had already finished."""
    return _finish(session, job_id, attempt, status="failed", error=error)


def finish_job_cancelled(*, session: Session, job_id: str, attempt: int | None = None) -> bool:
    """queued/running -> `cancelled`; False if the job had already finished."""
    return _finish(session, job_id, attempt, status="cancelled", cancel_requested=True)


def requeue_unsent_job(*, session: Session, job_id: str) -> bool:
    """A job that failed because the broker could not take it (`broker_unavailable`, written by
    the API at submission) goes back to `queued`, to be enqueued again; False otherwise."""
    job = session.get(Job, job_id, populate_existing=True)
    if job is None or job.status != "failed" or (job.error or {}).get("code") != UNSENT:
        session.rollback()
        return False
    return _conditional_update(
        session,
        [Job.id == job_id, Job.status == "failed", Job.finished_at == job.finished_at],
        status="queued", error=None, finished_at=None, stage=None, progress=0.0,
    )  # fmt: skip


def requeue_stale_jobs(*, session: Session, older_than: timedelta, max_attempts: int) -> list[str]:
    """Running jobs whose heartbeat is older than `older_than` go back to `queued` (their ids are
    returned, for the caller to enqueue again); those that used `max_attempts` claims end
    `failed`, and those with a cancel request end `cancelled`. One transaction."""
    now = utcnow()
    stale = [Job.status == "running", Job.heartbeat_at < now - older_than]
    rows = session.execute(select(Job.id, Job.attempts, Job.cancel_requested).where(*stale)).all()
    requeued: list[str] = []
    for job_id, attempts, cancel_requested in rows:
        values: dict[str, Any]
        if cancel_requested:
            values = {"status": "cancelled", "finished_at": now}
        elif attempts >= max_attempts:
            values = {"status": "failed", "finished_at": now, "error": attempts_exhausted(attempts)}
        else:
            values = {"status": "queued", "stage": "requeued", "progress": 0.0, "worker": None}
        result = session.execute(
            update(Job)
            .where(Job.id == job_id, *stale)
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        if result.rowcount == 1 and values["status"] == "queued":
            requeued.append(job_id)
    session.commit()
    return requeued
