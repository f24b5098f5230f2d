"""A job as the API shows it: its state, never its spec, idempotency key or worker."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from app.store.models import Job

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class JobPublic(BaseModel):
    id: str
    kind: str
    status: JobStatus
    stage: str | None
    progress: float
    parent: str = Field(description='"base" or the parent version\'s name')
    version: str | None = Field(description="the version this job made, once it has")
    metrics: dict[str, Any] | None
    error: dict[str, Any] | None
    attempts: int
    cancel_requested: bool = Field(
        description="a cancel was asked for: a running job stops at its next step, then ends "
        "`cancelled` (or finishes first, when it was nearly done)"
    )
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def from_row(cls, job: Job) -> JobPublic:
        return cls(
            id=job.id,
            kind=job.kind,
            status=job.status,  # type: ignore[arg-type]
            stage=job.stage,
            progress=job.progress,
            parent=job.parent_name,
            version=job.version_name,
            metrics=job.metrics,
            error=job.error,
            attempts=job.attempts,
            cancel_requested=bool(job.cancel_requested),
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
        )


class JobList(BaseModel):
    data: list[JobPublic]
    next_cursor: str | None = Field(description="pass as `cursor` for the next page; null at end")
