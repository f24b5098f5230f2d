"""Rows for store tests, made through the store's own functions."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from app.store import crud
from app.store.models import Job, Version

FINGERPRINT = "f" * 64
PARAM = "model.layers.1.mlp.down_proj.weight"


def delta(param: str = PARAM, blob: bytes = b"safetensors-bytes", encoding: str = "dense") -> dict:
    return {"param": param, "encoding": encoding, "dtype": "float32", "shape": [4, 8], "blob": blob}


def running_job(
    session: Session, *, kind: str = "dinm", parent_version_id: int | None = None
) -> Job:
    job, _ = crud.create_job(
        session=session, kind=kind, spec={"kind": kind}, parent_version_id=parent_version_id
    )
    claimed = crud.claim_job(session=session, job_id=job.id, worker="test-worker")
    assert claimed is not None
    return claimed


def version(
    session: Session,
    *,
    name: str | None = None,
    parent: Version | None = None,
    deltas: list[dict[str, Any]] | None = None,
) -> Version:
    job = running_job(session, parent_version_id=parent.id if parent else None)
    return crud.finish_job_succeeded(
        session=session,
        job_id=job.id,
        version_name=name,
        base_model="tiny",
        base_fingerprint=FINGERPRINT,
        metrics={"DS": 90.0},
        deltas=deltas or [delta()],
    )
