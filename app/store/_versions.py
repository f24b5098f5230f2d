"""Versions and their deltas: written with the job's success in one transaction, read verified.

A version is immutable once written; retiring hides it from "latest", listings and new jobs but
keeps its name and its rows (its children still need its delta).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, TypedDict

from sqlalchemy import select, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import flag_modified

from app.store._rows import add_unique, name_problem
from app.store._types import utcnow
from app.store.errors import (
    BaseFingerprintMismatch,
    DeltaChecksumError,
    DuplicateVersionName,
    InvalidVersionName,
    JobNotRunning,
    NotFound,
    VersionHasChildren,
)
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


class DeltaSummary(TypedDict):
    params: list[str]
    bytes: int
    encoding: str | None  # "dense" | "lowrank" | "mixed"; None without rows
    sha256: str


def check_version_name(name: str) -> str:
    """`name` if it may name a version: 1-64 of [A-Za-z0-9._-], alphanumeric first, not reserved."""
    problem = name_problem(name, "version")
    if problem is not None:
        raise InvalidVersionName(problem)
    return name


def check_version_name_free(*, session: Session, name: str) -> str:
    """`name` if a new version may take it: valid, and no version (retired or not) has it;
    else InvalidVersionName or DuplicateVersionName. The write itself checks again (a
    concurrent job may take the name meanwhile)."""
    check_version_name(name)
    if version_name_exists(session=session, name=name):
        raise DuplicateVersionName(name)
    return name


def get_version(*, session: Session, name: str, include_retired: bool = False) -> Version:
    """The version called `name`; "latest" is the newest live one. Raises NotFound (also for
    "base", which is the base model and has no row, and for retired versions unless asked)."""
    query = select(Version)
    if name == "latest":
        query = query.where(Version.retired.is_(False)).order_by(
            Version.created_at.desc(), Version.id.desc()
        )
    else:
        query = query.where(Version.name == name)
        if not include_retired:
            query = query.where(Version.retired.is_(False))
    version = session.scalars(query.limit(1)).first()
    if version is None:
        what = "no live versions yet" if name == "latest" else f"no version named {name!r}"
        raise NotFound(what)
    return version


def get_version_by_id(*, session: Session, version_id: int) -> Version:
    version = session.get(Version, version_id)
    if version is None:
        raise NotFound(f"no version with id {version_id}")
    return version


def version_name_exists(*, session: Session, name: str) -> bool:
    """True when any version, retired or not, has this name (names are never reused)."""
    return session.scalar(select(Version.id).where(Version.name == name)) is not None


def list_versions(*, session: Session, include_retired: bool = False) -> list[Version]:
    """Oldest first."""
    query = select(Version).order_by(Version.created_at, Version.id)
    if not include_retired:
        query = query.where(Version.retired.is_(False))
    return list(session.scalars(query).unique())


def merge_version_metrics(*, session: Session, version_id: int, key: str, value: Any) -> Version:
    """Set `metrics[key] = value` on a version, keeping the other keys; concurrent merges of
    different keys do not lose each other's writes. `value` must be JSON without NaN or
    infinities (ValueError). Retired versions can be updated too."""
    try:
        version = _merge_metrics(session, version_id, key, lambda _old: value)
        session.commit()
    except BaseException:
        session.rollback()
        raise
    return version


def _merge_metrics(
    session: Session, version_id: int, key: str, merge: Callable[[Any], Any]
) -> Version:
    """`metrics[key] = merge(metrics.get(key))` inside the caller's transaction (not committed)."""
    if not isinstance(key, str) or not key:
        raise ValueError("the metrics key must be a non-empty string")
    # Lock first (a row lock on PostgreSQL, the write lock on SQLite), then read the metrics as
    # they are now: a merge that ran meanwhile is seen, not overwritten.
    locked = session.execute(
        update(Version)
        .where(Version.id == version_id)
        .values(retired=Version.retired)
        .execution_options(synchronize_session=False)
    )
    if locked.rowcount != 1:
        raise NotFound(f"no version with id {version_id}")
    version = session.get(Version, version_id, populate_existing=True)
    assert version is not None
    metrics = dict(version.metrics or {})
    value = merge(metrics.get(key))
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"metrics[{key!r}] is not JSON (without NaN/Infinity): {exc}") from None
    metrics[key] = value
    version.metrics = metrics  # a new dict: the JSON column is seen as changed
    flag_modified(version, "metrics")
    return version


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
            _merge_metrics(
                session, parent, "eval", lambda old: {**(old or {}), **attach, "job_id": job_id}
            )
        session.commit()
    except BaseException:
        session.rollback()
        raise
    return True


def version_chain(*, session: Session, version_id: int) -> list[Version]:
    """The version and its ancestors, root first, ending with the version itself (base excluded):
    apply their deltas in this order to materialise it."""
    chain: list[Version] = []
    current: int | None = version_id
    while current is not None:
        version = get_version_by_id(session=session, version_id=current)
        if any(v.id == version.id for v in chain):
            raise RuntimeError(f"version {version.name!r} is its own ancestor")
        chain.append(version)
        current = version.parent_id
    return chain[::-1]


def live_children(*, session: Session, version_id: int) -> list[Version]:
    """Direct children that are not retired, oldest first."""
    query = (
        select(Version)
        .where(Version.parent_id == version_id, Version.retired.is_(False))
        .order_by(Version.created_at, Version.id)
    )
    return list(session.scalars(query).unique())


def _descendants(session: Session, version_id: int) -> list[Version]:
    found: list[Version] = []
    frontier = [version_id]
    while frontier:
        query = select(Version).where(Version.parent_id.in_(frontier)).order_by(Version.id)
        level = list(session.scalars(query).unique())
        found.extend(level)
        frontier = [v.id for v in level]
    return found


def retire_version(*, session: Session, name: str, cascade: bool = False) -> list[Version]:
    """Retire `name`; returns the versions retired (it first, then its live descendants).

    Refused with VersionHasChildren while live descendants exist, unless `cascade`, which retires
    the whole subtree. Unknown or already retired names raise NotFound; "latest" is refused.
    """
    if name == "latest":
        raise InvalidVersionName("retire a version by its own name, not 'latest'")
    version = get_version(session=session, name=name)
    live = [v for v in _descendants(session, version.id) if not v.retired]
    if live and not cascade:
        raise VersionHasChildren(name, [v.name for v in live])
    retired = [version, *live]
    session.execute(
        update(Version)
        .where(Version.id.in_([v.id for v in retired]))
        .values(retired=True)
        .execution_options(synchronize_session=False)
    )
    session.commit()
    for v in retired:
        session.refresh(v)
    return retired


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


def load_delta_blobs(
    *, session: Session, version_id: int, base_fingerprint: str | None = None
) -> list[tuple[str, bytes]]:
    """The version's own delta blobs as (param, safetensors bytes), sorted by param.

    Every blob's sha256 (and length) is checked against the row: DeltaChecksumError names the
    version and param. With `base_fingerprint`, a version made for another base is refused
    (BaseFingerprintMismatch) before anything is read.
    """
    version = get_version_by_id(session=session, version_id=version_id)
    if base_fingerprint is not None and version.base_fingerprint != base_fingerprint:
        raise BaseFingerprintMismatch(version.name, base_fingerprint, version.base_fingerprint)
    query = select(DeltaRow.param, DeltaRow.blob, DeltaRow.sha256, DeltaRow.nbytes).where(
        DeltaRow.version_id == version_id
    )
    blobs: list[tuple[str, bytes]] = []
    for param, blob, sha256, nbytes in sorted(session.execute(query), key=lambda r: r[0]):
        blob = bytes(blob)
        actual = hashlib.sha256(blob).hexdigest()
        if actual != sha256 or len(blob) != nbytes:
            raise DeltaChecksumError(version.name, param, sha256, actual)
        blobs.append((param, blob))
    return blobs


class ChainBlobs(TypedDict):
    """One version of a chain: its name, its delta's summary sha256, whether it is retired, its
    blobs by param."""

    name: str
    sha256: str
    retired: bool
    blobs: list[tuple[str, bytes]]


def load_chain_blobs(
    *, session: Session, version_id: int, base_fingerprint: str | None = None
) -> list[ChainBlobs]:
    """The blobs of the version's whole chain, root first (`version_chain` order), each version's
    checked as `load_delta_blobs` checks them; `sha256` is the version's `delta_summary` one."""
    chain = version_chain(session=session, version_id=version_id)
    summaries = delta_summaries(session=session, version_ids=[v.id for v in chain])
    return [
        {
            "name": version.name,
            "sha256": summaries[version.id]["sha256"],
            "retired": version.retired,
            "blobs": load_delta_blobs(
                session=session, version_id=version.id, base_fingerprint=base_fingerprint
            ),
        }
        for version in chain
    ]


def delta_summaries(*, session: Session, version_ids: Iterable[int]) -> dict[int, DeltaSummary]:
    """`delta_summary` for many versions in one query (blobs are not read)."""
    ids = list(version_ids)
    rows: dict[int, list[tuple[str, str, int, str]]] = {i: [] for i in ids}
    query = select(
        DeltaRow.version_id, DeltaRow.param, DeltaRow.encoding, DeltaRow.nbytes, DeltaRow.sha256
    ).where(DeltaRow.version_id.in_(ids))
    for version_id, param, encoding, nbytes, sha256 in session.execute(query):
        rows[version_id].append((param, encoding, nbytes, sha256))
    return {i: _summary(sorted(r)) for i, r in rows.items()}


def delta_summary(*, session: Session, version_id: int) -> DeltaSummary:
    """{"params": sorted names, "bytes": total blob size, "encoding": "dense"|"lowrank"|"mixed",
    "sha256": sha256 of the rows' hex sha256s concatenated in param order}."""
    return delta_summaries(session=session, version_ids=[version_id])[version_id]


def _summary(rows: list[tuple[str, str, int, str]]) -> DeltaSummary:
    encodings = {encoding for _, encoding, _, _ in rows}
    encoding = encodings.pop() if len(encodings) == 1 else ("mixed" if encodings else None)
    digest = hashlib.sha256("".join(sha for *_, sha in rows).encode("ascii")).hexdigest()
    return {
        "params": [param for param, *_ in rows],
        "bytes": sum(nbytes for _, _, nbytes, _ in rows),
        "encoding": encoding,
        "sha256": digest,
    }
