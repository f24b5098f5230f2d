"""/v1/versions: list, show ("latest" resolves), retire (with `cascade` for live children)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from sqlalchemy.orm import Session

from app.api.auth import Editor, Reader
from app.api.deps import SessionDep, SettingsDep
from app.api.schemas import VersionList, VersionPublic
from app.notify import publish_versions_changed
from app.store import crud
from app.store.models import Version

router = APIRouter(prefix="/v1/versions", tags=["versions"])


def _public(session: Session, versions: list[Version]) -> VersionList:
    deltas = crud.delta_summaries(session=session, version_ids=[v.id for v in versions])
    return VersionList(data=[VersionPublic.from_row(v, deltas[v.id]) for v in versions])


@router.get("", response_model=VersionList, dependencies=[Reader])
def list_versions(
    session: SessionDep,
    include_retired: Annotated[bool, Query(description="list retired versions too")] = False,
) -> VersionList:
    """Oldest first."""
    versions = crud.list_versions(session=session, include_retired=include_retired)
    return _public(session, versions)


@router.get("/{name}", response_model=VersionPublic, dependencies=[Reader])
def get_version(name: str, session: SessionDep) -> VersionPublic:
    """A version by name (retired ones too, marked so); "latest" is the newest live one."""
    version = crud.get_version(session=session, name=name, include_retired=name != "latest")
    return _public(session, [version]).data[0]


@router.delete("/{name}", response_model=VersionList, dependencies=[Editor])
def retire_version(
    name: str,
    session: SessionDep,
    settings: SettingsDep,
    cascade: Annotated[bool, Query(description="retire its live descendants too")] = False,
) -> VersionList:
    """Retire a version (its rows stay; it leaves listings, "latest" and new jobs' parents).
    A version with live children is refused (409) unless `cascade=true`."""
    retired = crud.retire_version(session=session, name=name, cascade=cascade)
    publish_versions_changed(settings.resolved_broker_url())  # other API processes drop it now
    return _public(session, retired)
