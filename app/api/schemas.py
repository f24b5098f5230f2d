"""Request and response bodies: one family per entity (Create / Public / list wrapper).

Public models are built from store rows by `from_row`; what is not in them (spec, idempotency key,
worker, delta blobs) never leaves the server.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.store import crud
from app.store.models import ApiKey, Corpus, Job, Version

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
ExportFormat = Literal["peft", "merged", "delta"]


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
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
        )


class CorpusPublic(BaseModel):
    id: str
    name: str | None
    documents: int = Field(description="documents in the corpus")
    annotated: int = Field(description="documents with explicit harmful_spans")
    bytes: int = Field(description="size of the stored (normalised) JSON Lines")
    sha256: str = Field(description="sha256 of the stored JSON Lines")
    created_at: datetime

    @classmethod
    def from_row(cls, corpus: Corpus) -> CorpusPublic:
        return cls(
            id=corpus.id,
            name=corpus.name,
            documents=corpus.documents,
            annotated=corpus.annotated,
            bytes=corpus.nbytes,
            sha256=corpus.sha256,
            created_at=corpus.created_at,
        )


class CorpusList(BaseModel):
    data: list[CorpusPublic]


class JobList(BaseModel):
    data: list[JobPublic]
    next_cursor: str | None = Field(description="pass as `cursor` for the next page; null at end")


class DeltaPublic(BaseModel):
    params: list[str]
    bytes: int
    encoding: str | None
    sha256: str


class VersionPublic(BaseModel):
    name: str
    parent: str = Field(description='"base" or the parent version\'s name')
    job_id: str | None
    kind: str
    created_at: datetime
    metrics: dict[str, Any] | None
    delta: DeltaPublic
    retired: bool

    @classmethod
    def from_row(cls, version: Version, delta: crud.DeltaSummary) -> VersionPublic:
        return cls(
            name=version.name,
            parent=version.parent_name,
            job_id=version.job_id,
            kind=version.kind,
            created_at=version.created_at,
            metrics=version.metrics,
            delta=DeltaPublic(**delta),
            retired=version.retired,
        )


class VersionList(BaseModel):
    data: list[VersionPublic]


class CheckResult(BaseModel):
    ok: bool
    detail: str


class Readiness(BaseModel):
    status: Literal["ready"]
    checks: dict[str, CheckResult]


Role = Literal["reader", "editor", "admin"]


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200, description="who or what uses the key")
    role: Role = Field(
        "reader",
        description="reader (generate, read), editor (+ jobs, versions, corpora), admin (+ keys)",
    )


class KeyPublic(BaseModel):
    id: int
    name: str
    role: Role
    prefix: str | None = Field(description="the key's first characters, to tell keys apart")
    created_at: datetime
    revoked_at: datetime | None

    @classmethod
    def from_row(cls, key: ApiKey) -> KeyPublic:
        return cls(
            id=key.id,
            name=key.name,
            role=key.role,  # type: ignore[arg-type]
            prefix=key.prefix,
            created_at=key.created_at,
            revoked_at=key.revoked_at,
        )


class KeyCreated(KeyPublic):
    key: str = Field(description="the key itself: shown this once, never again")


class KeyList(BaseModel):
    data: list[KeyPublic]
