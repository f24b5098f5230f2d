"""/v1/versions: list, show ("latest" resolves), retire (with `cascade` for live children), and
export (a PEFT LoRA adapter, a merged model, or the summed delta)."""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, Response, StreamingResponse
from sqlalchemy.orm import Session
from starlette.background import BackgroundTask

from app.api.auth import Editor, Reader
from app.api.deps import SessionDep, SettingsDep
from app.api.errors import INTERNAL, UNAVAILABLE, ApiError
from app.api.schemas import ExportFormat, VersionList, VersionPublic
from app.api.tarstream import FolderTar
from app.ml import errors as ml_errors
from app.notify import publish_versions_changed
from app.serving.errors import EngineClosedError, ModelLoadError, ServingError
from app.settings import Settings
from app.store import crud
from app.store.models import Version

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/versions", tags=["versions"])

_EXPORT_RESPONSES: dict[int | str, dict] = {
    200: {
        "description": "peft and merged: a tar of the folder (one top folder, `NAME-FORMAT/`); "
        "delta: the safetensors file",
        "content": {"application/x-tar": {}, "application/octet-stream": {}},
    },
    404: {"description": "no such version"},
    409: {"description": "the version's deltas do not fit the served base model"},
    422: {
        "description": "a bad format or bound, or a version this format cannot hold (a bias "
        "change as LoRA; more than `max_rank` to meet `max_rel_error`)"
    },
}
_MAX_REL_ERROR = (
    "peft: the relative Frobenius error that a dense update's truncated SVD may leave, per module"
)


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
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    cascade: Annotated[bool, Query(description="retire its live descendants too")] = False,
) -> VersionList:
    """Retire a version (its rows stay; it leaves listings, "latest" and new jobs' parents).
    A version with live children is refused (409 `version_has_children`) unless `cascade=true`;
    one that an arm of a running experiment serves (it, or with `cascade` any descendant) is
    refused (409 `version_in_experiment`, naming the experiments): stop those first."""
    retired = crud.retire_version(session=session, name=name, cascade=cascade)
    publish_versions_changed(settings.resolved_broker_url())  # other API processes drop it now
    _refresh_engine(request)
    return _public(session, retired)


def _refresh_engine(request: Request) -> None:
    """This process's engine stops serving what was retired at once, not at its next poll."""
    engine = request.app.state.serving.engine_if_loaded()
    if engine is None:
        return
    try:
        engine.refresh()
    except Exception:  # its next poll tries again (a vLLM engine that is down, say)
        log.warning("could not refresh the serving engine after a retire", exc_info=True)


@router.get(
    "/{name}/export", response_class=Response, responses=_EXPORT_RESPONSES, dependencies=[Reader]
)
def export_version(
    name: str,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    fmt: Annotated[
        ExportFormat,
        Query(
            alias="format",
            description="peft: a PEFT LoRA adapter folder; merged: a Hugging Face model "
            "folder; delta: the chain summed into one safetensors delta",
        ),
    ],
    max_rel_error: Annotated[float, Query(ge=1e-6, lt=1, description=_MAX_REL_ERROR)] = 1e-3,
    max_rank: Annotated[
        int | None, Query(ge=1, description="peft: the highest LoRA rank of any module")
    ] = None,
) -> Response:
    """A version (retired ones too; "latest" is the newest live one) with its whole chain, as
    another tool loads it: `peft` for `peft.PeftModel.from_pretrained` and vLLM's LoRA serving
    (low-rank deltas exact, dense ones by truncated SVD; ranks and errors in
    `detox_export.json`), `merged` for `AutoModelForCausalLM.from_pretrained`, `delta` for
    `detox eval --delta`. Built with the served base model; generations are not disturbed."""
    version = crud.get_version(session=session, name=name, include_retired=name != "latest")
    session.close()  # no connection is held while the export is built
    folder = Path(tempfile.mkdtemp(prefix=f"{version.name}-{fmt}-", dir=_exports_dir(settings)))
    try:
        serving = request.app.state.serving.get_sync()
        from app.serving.export import export_version as build  # torch: only when exporting

        made = build(
            serving.engine, fmt=fmt, version=version.name, version_id=version.id, out=folder,
            max_rel_error=max_rel_error, max_rank=max_rank,
        )  # fmt: skip
    except BaseException as exc:
        shutil.rmtree(folder, ignore_errors=True)
        mapped = _export_error(exc)
        if mapped is None:
            raise
        raise mapped from exc
    cleanup = BackgroundTask(shutil.rmtree, folder, ignore_errors=True)
    if fmt == "delta":
        return FileResponse(
            made.path, media_type="application/octet-stream", filename=made.path.name,
            background=cleanup,
        )  # fmt: skip
    root = f"{version.name}-{fmt}"
    tar = FolderTar(made.path, root)
    headers = {
        "Content-Disposition": f'attachment; filename="{root}.tar"',
        "Content-Length": str(tar.size),
    }
    return StreamingResponse(
        _removing(tar, folder), media_type="application/x-tar", headers=headers,
        background=cleanup,
    )  # fmt: skip


def _exports_dir(settings: Settings) -> Path:
    path = settings.home_dir() / "exports"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _removing(chunks: FolderTar, folder: Path) -> Iterator[bytes]:
    """The tar's chunks; the folder goes once they are sent (or the client went away)."""
    try:
        yield from chunks
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _export_error(exc: BaseException) -> ApiError | None:
    if isinstance(exc, ml_errors.RankBoundError):
        return ApiError(422, str(exc), param="max_rank", code="rank_bound_not_met")
    if isinstance(exc, ml_errors.ExportError):
        return ApiError(422, str(exc), param="format", code="not_exportable")
    if isinstance(exc, ml_errors.DeltaError | ModelLoadError):  # corrupt, or another base's
        return ApiError(409, str(exc), code="version_not_exportable")
    if isinstance(exc, EngineClosedError):
        return ApiError(503, str(exc), type=UNAVAILABLE, code="engine_closed")
    if isinstance(exc, ServingError):
        return ApiError(500, str(exc), type=INTERNAL, code="serving_error")
    return None
