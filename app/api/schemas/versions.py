"""A version as the API shows it: lineage, metrics and a summary of its delta (never the blobs)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from app.store import crud
from app.store.models import Version

ExportFormat = Literal["peft", "merged", "delta"]


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
