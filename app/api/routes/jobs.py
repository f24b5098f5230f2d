"""/v1/jobs: submit (202; kinds dinm, unlearn, eval), read, list, cancel, and follow a job as
server-sent events."""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, Query, Request, Response
from fastapi.responses import StreamingResponse
from sqlalchemy.orm import Session

from app.api import events
from app.api.auth import RATE_LIMIT, Editor, EditorDep, Principal, Reader
from app.api.broker import Broker
from app.api.deps import BrokerDep, SessionDep, SettingsDep
from app.api.errors import ApiError
from app.api.model_info import layer_count, model_name
from app.api.schemas import JobList, JobPublic, JobStatus
from app.job_spec import (
    JOB_EXAMPLES,
    AnyJob,
    DinmJobCreate,
    EvalJobCreate,
    JobCreate,
    UnlearnJobCreate,
)
from app.settings import Settings
from app.store import crud
from app.store.errors import NotFound
from app.store.models import Job, Version

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

ACTIVE_JOBS_RETRY_AFTER_S = 30

IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=255,
        description="a retried POST with the same key returns the same job",
    ),
]


@router.post("", status_code=202, response_model=JobPublic)
def submit_job(
    body: Annotated[JobCreate, Body(openapi_examples=JOB_EXAMPLES)],
    session: SessionDep,
    settings: SettingsDep,
    broker: BrokerDep,
    response: Response,
    caller: EditorDep,
    idempotency_key: IdempotencyKey = None,
) -> JobPublic:
    """Validate the job, write it `queued` and enqueue it; the worker does the rest.

    `dinm` and `unlearn` make a new version on top of `parent`; `eval` runs suites on `model` and
    attaches the results to it (its job's `parent` is the evaluated version)."""
    job_in = body.root
    request_hash = _request_hash(job_in) if idempotency_key is not None else None
    if idempotency_key is not None:
        existing = crud.find_job_by_idempotency_key(session=session, key=idempotency_key)
        if existing is not None:
            _check_retry(existing, caller, request_hash)
            if crud.requeue_unsent_job(session=session, job_id=existing.id):
                _enqueue(session, broker, existing.id)  # the broker is back: send it now
            else:
                response.headers["Idempotent-Replayed"] = "true"
            return JobPublic.from_row(crud.get_job(session=session, job_id=existing.id))
    _check_against_model(job_in, settings)
    parent_id, spec = _prepare(session, job_in)
    _check_active_jobs(session, caller, settings.max_active_jobs_per_key)
    job, created = crud.create_job(
        session=session,
        kind=job_in.kind,
        spec=spec,
        parent_version_id=parent_id,
        idempotency_key=idempotency_key,
        request_hash=request_hash,
        api_key_id=caller.key_id,
    )
    if created:
        _enqueue(session, broker, job.id)
    else:  # a concurrent request with the same key won the insert
        _check_retry(job, caller, request_hash)
        response.headers["Idempotent-Replayed"] = "true"
    return JobPublic.from_row(crud.get_job(session=session, job_id=job.id))


def _request_hash(job: AnyJob) -> str:
    """SHA-256 of the validated body in canonical JSON: the same request, however written
    (key order, defaults spelled out or left out), has the same hash."""
    canonical = json.dumps(job.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _check_retry(job: Job, caller: Principal, request_hash: str | None) -> None:
    """A request with a used Idempotency-Key must be a retry: the same key's owner and the same
    body (a job from before request hashes were kept is taken at its word)."""
    if job.api_key_id != caller.key_id:
        raise ApiError(
            409,
            "this Idempotency-Key was already used by another API key; choose a unique key "
            "per job (a UUID)",
            param="Idempotency-Key",
            code="idempotency_key_in_use",
        )
    if job.request_hash is not None and job.request_hash != request_hash:
        raise ApiError(
            422,
            f"this Idempotency-Key was used for job {job.id} with a different body; a retry "
            "must send the same body, a new job needs a new key",
            param="Idempotency-Key",
            code="idempotency_key_reused",
        )


def _check_active_jobs(session: Session, caller: Principal, limit: int) -> None:
    active = crud.count_active_jobs(session=session, api_key_id=caller.key_id)
    if active >= limit:
        raise ApiError(
            429,
            f"{caller.name!r} has {active} queued or running jobs, the most one key may have "
            f"(DETOX_MAX_ACTIVE_JOBS_PER_KEY); wait for some to finish",
            type=RATE_LIMIT,
            code="too_many_active_jobs",
            headers={"Retry-After": str(ACTIVE_JOBS_RETRY_AFTER_S)},
        )


def _check_against_model(job: AnyJob, settings: Settings) -> None:
    """What the base model's config says cannot run (a layer it does not have, a rank above its
    projections' full rank): 422 now, not a failed job later. Skipped when the config cannot be
    read here (the worker checks then, before any expensive stage)."""
    if isinstance(job, DinmJobCreate):
        asked = [("params.layer", job.params.layer)] if job.params.layer is not None else []
    elif isinstance(job, UnlearnJobCreate):
        asked = [(f"params.layers[{i}]", n) for i, n in enumerate(job.params.layers or ())]
    else:
        return
    layers = layer_count(settings) if asked else None
    for param, layer in asked:
        if layers is not None and layer >= layers:
            raise ApiError(
                422,
                f"{param}: layer {layer} is out of range: the model {model_name(settings)} has "
                f"layers 0..{layers - 1}",
                param=param,
                code="layer_out_of_range",
            )


def _prepare(session: Session, job: AnyJob) -> tuple[int | None, dict[str, Any]]:
    """(parent version id, spec to store), every name the job refers to resolved."""
    if isinstance(job, EvalJobCreate):
        version = _version(session, job.model, param="model", code="model_not_found")
        return (
            version.id if version else None,
            job.spec(model=version.name if version else "base"),
        )
    parent = _version(session, job.parent, param="parent", code="parent_not_found")
    if job.name is not None:  # 409 duplicate_version_name before anything is queued
        crud.check_version_name_free(session=session, name=job.name)
    parent_id = parent.id if parent else None
    if isinstance(job, UnlearnJobCreate):
        corpus_id = _corpus_id(session, job.corpus_id, "corpus_id")
        retain_id = _corpus_id(session, job.retain_corpus_id, "retain_corpus_id")
        return parent_id, job.spec(corpus_id=corpus_id, retain_corpus_id=retain_id)
    return parent_id, job.spec()


def _version(session: Session, name: str, *, param: str, code: str) -> Version | None:
    """The live version called `name` ("latest": the newest), None for "base"; else 404."""
    if name == "base":
        return None
    try:
        return crud.get_version(session=session, name=name)
    except NotFound:
        raise ApiError(
            404,
            f"{param} {name!r} is not a live version (unknown or retired)",
            param=param,
            code=code,
        ) from None


def _corpus_id(session: Session, ref: str | None, param: str) -> str | None:
    if ref is None:
        return None
    try:
        return crud.get_corpus(session=session, id_or_name=ref).id
    except NotFound:
        raise ApiError(
            404,
            f"{param}: no corpus {ref!r} (upload it with POST /v1/corpora)",
            param=param,
            code="corpus_not_found",
        ) from None


def _enqueue(session: Session, broker: Broker, job_id: str) -> None:
    """Enqueue, or fail the job: a job the queue never got must not stay `queued`."""
    try:
        broker.enqueue(job_id)
    except Exception as exc:
        error = {
            "type": "broker_unavailable",
            "code": crud.UNSENT,
            "message": f"the job could not be queued: {exc}; submitting again with the same "
            "Idempotency-Key sends this job",
        }
        crud.finish_job_failed(session=session, job_id=job_id, error=error)
        raise


@router.get("", response_model=JobList, dependencies=[Reader])
def list_jobs(
    session: SessionDep,
    status: Annotated[JobStatus | None, Query(description="only jobs in this state")] = None,
    limit: Annotated[int, Query(ge=1, le=crud.MAX_PAGE, description="jobs per page")] = 50,
    cursor: Annotated[str | None, Query(description="`next_cursor` of the previous page")] = None,
) -> JobList:
    """Newest first."""
    page = crud.list_jobs(session=session, status=status, limit=limit, cursor=cursor)
    return JobList(data=[JobPublic.from_row(j) for j in page.items], next_cursor=page.next_cursor)


@router.get("/{job_id}", response_model=JobPublic, dependencies=[Reader])
def get_job(job_id: str, session: SessionDep) -> JobPublic:
    return JobPublic.from_row(crud.get_job(session=session, job_id=job_id))


@router.post("/{job_id}/cancel", response_model=JobPublic, dependencies=[Editor])
def cancel_job(job_id: str, session: SessionDep) -> JobPublic:
    """A queued job is cancelled at once, a running one between steps; a finished one stays."""
    return JobPublic.from_row(crud.request_cancel(session=session, job_id=job_id))


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "event stream"}},
    dependencies=[Reader],
)
def job_events(job_id: str, request: Request, session: SessionDep) -> StreamingResponse:
    """Server-sent events: `progress` (the job JSON) whenever its status, stage or progress
    changes, then one `done` with the final job JSON; the stream ends there."""
    crud.get_job(session=session, job_id=job_id)  # 404 before the stream starts
    stream = events.job_events(request, request.app.state.sessionmaker, job_id)
    return StreamingResponse(
        stream,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
