"""A job's successful end, in ONE transaction with its rows: a DINM or unlearning job's version
and its delta rows, or an eval job's results merged into the evaluated version's metrics.

Fenced like every job write (`_jobs`): only a job still `running` (in the given attempt) can
succeed, so a superseded worker writes nothing.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, TypedDict

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.store._rows import add_unique
from app.store._types import utcnow
from app.store._versions import (
    check_version_name,
    merge_metrics_in_transaction,
    version_name_exists,
)
from app.store.errors import DuplicateVersionName, JobNotRunning, NotFound
from app.store.models import DELTA_ENCODINGS, VERSION_KINDS, DeltaRow, Job, Version

_DEFAULT_NAME = re.compile(r"v(\d+)")
_NAME_RACE_RETRIES = 5


class _NameTaken(Exception):
    """The version name is taken (maybe by a concurrent writer); the transaction was rolled back."""


class DeltaIn(TypedDict):
    """One parameter's delta as the worker hands it over."""

    param: str
    encoding: str  # "dense" | "lowrank"
    dtype: str
    shape: Sequence[int]
    blob: bytes  # safetensors bytes


def finish_job_succeeded(
    *,
    session: Session,
    job_id: str,
    base_model: str,
    base_fingerprint: str,
    metrics: dict[str, Any],
    deltas: Iterable[Mapping[str, Any]],
    version_name: str | None = None,
    attempt: int | None = None,
) -> Version:
    """In ONE transaction: the job (which must be `running`, in `attempt` when given) becomes
    `succeeded` with `metrics`, and its version is written with all its delta rows.

    The version's parent and kind are the job's. Without `version_name` the name is `v{N}`, N one
    more than the largest N in use. Raises DuplicateVersionName, InvalidVersionName, JobNotRunning
    or NotFound, and then nothing at all was written.
    """
    if version_name is not None:
        check_version_name(version_name)
    rows = [_delta_row(d) for d in deltas]
    if not rows:
        raise ValueError("a version needs at least one delta")
    for _ in range(_NAME_RACE_RETRIES):
        try:
            return _write_version(
                session, job_id, version_name, base_model, base_fingerprint, metrics, rows, attempt
            )
        except _NameTaken as taken:
            if version_name is not None:
                raise DuplicateVersionName(version_name) from taken.__cause__
            # Another job took the same default name concurrently: pick the next one.
        except BaseException:
            session.rollback()
            raise
    raise RuntimeError(f"could not pick a free default version name in {_NAME_RACE_RETRIES} tries")


def _mark_succeeded(
    session: Session, job_id: str, metrics: dict[str, Any], attempt: int | None, now: datetime
) -> bool:
    """running (in `attempt`, when given) -> succeeded with `metrics`, uncommitted; whether it
    was."""
    fence = [Job.attempts == attempt] if attempt is not None else []
    done = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == "running", *fence)
        .values(status="succeeded", stage="done", progress=1.0, metrics=metrics)
        .values(finished_at=now, heartbeat_at=now)
        .execution_options(synchronize_session=False)
    )
    return done.rowcount == 1


def _write_version(
    session: Session,
    job_id: str,
    version_name: str | None,
    base_model: str,
    base_fingerprint: str,
    metrics: dict[str, Any],
    rows: list[dict[str, Any]],
    attempt: int | None,
) -> Version:
    now = utcnow()
    # The job's row first: on SQLite this takes the write lock, so the default name below is
    # computed with no other writer about.
    done = _mark_succeeded(session, job_id, metrics, attempt, now)
    job = session.get(Job, job_id, populate_existing=True)
    if job is None:
        raise NotFound(f"no job {job_id!r}")
    if not done:
        session.rollback()
        job = session.get(Job, job_id, populate_existing=True)
        assert job is not None
        raise JobNotRunning(job_id, job.status, job.attempts)
    if job.kind not in VERSION_KINDS:
        raise ValueError(f"a {job.kind} job does not make versions; use finish_job_evaluated")
    name = version_name or _next_default_name(session)
    version = Version(
        name=name,
        parent_id=job.parent_version_id,
        job_id=job_id,
        kind=job.kind,
        base_model=base_model,
        base_fingerprint=base_fingerprint,
        metrics=metrics,
        created_at=now,
        retired=False,
    )
    add_unique(
        session,
        version,
        clash=lambda: _NameTaken(name) if version_name_exists(session=session, name=name) else None,
        commit=False,
    )
    _add_delta_rows(session, version.id, rows)
    session.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(result_version_id=version.id)
        .execution_options(synchronize_session=False)
    )
    session.commit()
    session.refresh(job)
    return version


def _add_delta_rows(session: Session, version_id: int, rows: list[dict[str, Any]]) -> None:
    for row in rows:
        session.add(DeltaRow(version_id=version_id, **row))
        session.flush()


def _next_default_name(session: Session) -> str:
    names = session.scalars(select(Version.name).where(Version.name.like("v%")))
    numbers = [int(m.group(1)) for n in names if (m := _DEFAULT_NAME.fullmatch(n))]
    return f"v{max(numbers, default=0) + 1}"


def _delta_row(delta: Mapping[str, Any]) -> dict[str, Any]:
    param, encoding, blob = delta["param"], delta["encoding"], delta["blob"]
    if encoding not in DELTA_ENCODINGS:
        raise ValueError(f"delta {param!r}: unknown encoding {encoding!r}")
    if not isinstance(blob, bytes | bytearray | memoryview):
        raise TypeError(f"delta {param!r}: blob must be bytes, not {type(blob).__name__}")
    blob = bytes(blob)
    return {
        "param": str(param),
        "encoding": encoding,
        "dtype": str(delta["dtype"]),
        "shape": [int(n) for n in delta["shape"]],
        "blob": blob,
        "sha256": hashlib.sha256(blob).hexdigest(),
        "nbytes": len(blob),
    }


def finish_job_evaluated(
    *,
    session: Session,
    job_id: str,
    metrics: dict[str, Any],
    attach: dict[str, Any] | None = None,
    attempt: int | None = None,
) -> bool:
    """In ONE transaction: the running `eval` job (in `attempt` when given) becomes `succeeded`
    with `metrics` and no version, and `attach` (suite -> results) is merged into the evaluated
    version's `metrics["eval"]`, with `job_id` naming this job: suites evaluated earlier stay, a
    suite evaluated again is replaced. An evaluation of the base (no parent) attaches nothing.
    False, and nothing written, when the job was no longer running in that attempt."""
    try:
        if not _mark_succeeded(session, job_id, metrics, attempt, utcnow()):
            session.rollback()
            return False
        parent = session.scalar(select(Job.parent_version_id).where(Job.id == job_id))
        if attach and parent is not None:
            merge_metrics_in_transaction(
                session, parent, "eval", lambda old: {**(old or {}), **attach, "job_id": job_id}
            )
        session.commit()
    except BaseException:
        session.rollback()
        raise
    return True
