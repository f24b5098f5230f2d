"""What the operators' metrics read from the store: job counts and the run times of finished
jobs (never the rows themselves)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.store.models import TERMINAL_STATUSES, Job


def job_counts(*, session: Session) -> dict[tuple[str, str], int]:
    """(kind, status) -> how many jobs; pairs with none are left out."""
    query = select(Job.kind, Job.status, func.count()).group_by(Job.kind, Job.status)
    return {(kind, status): n for kind, status, n in session.execute(query)}


def finished_job_times(*, session: Session) -> list[tuple[str, datetime, datetime]]:
    """(kind, started_at, finished_at) of every job that ran and is finished."""
    query = select(Job.kind, Job.started_at, Job.finished_at).where(
        Job.status.in_(TERMINAL_STATUSES), Job.started_at.is_not(None)
    )
    return [(kind, started, finished) for kind, started, finished in session.execute(query)]
