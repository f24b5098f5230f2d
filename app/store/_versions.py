"""Versions: their names, lookups, lineage, retiring, and metrics merged in later.

A version is written with its job's success (`_job_results`) and immutable from then on but for
its metrics (an eval job attaches results); retiring hides it from "latest", listings and new
jobs but keeps its name and its rows (its children still need its delta). Its delta rows are read
back through `_deltas`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import flag_modified

from app.store._experiments import running_experiments_serving
from app.store._rows import name_problem
from app.store.errors import (
    DuplicateVersionName,
    InvalidVersionName,
    NotFound,
    VersionHasChildren,
    VersionInExperiment,
)
from app.store.models import Version


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
        version = merge_metrics_in_transaction(session, version_id, key, lambda _old: value)
        session.commit()
    except BaseException:
        session.rollback()
        raise
    return version


def merge_metrics_in_transaction(
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
    the whole subtree, and with VersionInExperiment while a running experiment has an arm on any
    version it would retire. Unknown or already retired names raise NotFound; "latest" is refused.
    """
    if name == "latest":
        raise InvalidVersionName("retire a version by its own name, not 'latest'")
    version = get_version(session=session, name=name)
    live = [v for v in _descendants(session, version.id) if not v.retired]
    if live and not cascade:
        raise VersionHasChildren(name, [v.name for v in live])
    retired = [version, *live]
    experiments = running_experiments_serving(session=session, models=[v.name for v in retired])
    if experiments:
        raise VersionInExperiment(name, experiments)
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
