"""/v1/jobs: submit (202), read, list, cancel, and follow a job as server-sent events."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Header, Query, Request, Response
from fastapi.responses import StreamingResponse
from sqlalchemy.orm import Session

from app.api import events
from app.api.broker import Broker
from app.api.deps import BrokerDep, SessionDep
from app.api.errors import ApiError
from app.api.schemas import JOB_EXAMPLES, JobCreate, JobList, JobPublic, JobStatus
from app.store import crud
from app.store.errors import NotFound

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
MAX_PAGE = 1000  # the store's own cap on a page

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
    broker: BrokerDep,
    response: Response,
    idempotency_key: IdempotencyKey = None,
) -> JobPublic:
    """Validate the edit, write a `queued` job and enqueue it; the worker does the rest."""
    if idempotency_key is not None:
        existing = crud.find_job_by_idempotency_key(session=session, key=idempotency_key)
        if existing is not None:
            response.headers["Idempotent-Replayed"] = "true"
            return JobPublic.from_row(existing)
    parent_id = _parent_id(session, body.parent)
    if body.name is not None and crud.version_name_exists(session=session, name=body.name):
        raise ApiError(
            409,
            f"a version named {body.name!r} already exists",
            param="name",
            code="duplicate_version_name",
        )
    job, created = crud.create_job(
        session=session,
        kind=body.kind,
        spec=body.spec(),
        parent_version_id=parent_id,
        idempotency_key=idempotency_key,
    )
    if created:
        _enqueue(session, broker, job.id)
    else:
        response.headers["Idempotent-Replayed"] = "true"
    return JobPublic.from_row(crud.get_job(session=session, job_id=job.id))


def _parent_id(session: Session, parent: str) -> int | None:
    if parent == "base":
        return None
    try:
        return crud.get_version(session=session, name=parent).id
    except NotFound:
        raise ApiError(
            404,
            f"parent {parent!r} is not a live version (unknown or retired)",
            param="parent",
            code="parent_not_found",
        ) from None


def _enqueue(session: Session, broker: Broker, job_id: str) -> None:
    """Enqueue, or fail the job: a job the queue never got must not stay `queued`."""
    try:
        broker.enqueue(job_id)
    except Exception as exc:
        error = {
            "type": "broker_unavailable",
            "code": "broker_unavailable",
            "message": f"the job could not be queued: {exc}",
        }
        crud.finish_job_failed(session=session, job_id=job_id, error=error)
        raise


@router.get("", response_model=JobList)
def list_jobs(
    session: SessionDep,
    status: Annotated[JobStatus | None, Query(description="only jobs in this state")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE, description="jobs per page")] = 50,
    cursor: Annotated[str | None, Query(description="`next_cursor` of the previous page")] = None,
) -> JobList:
    """Newest first."""
    page = crud.list_jobs(session=session, status=status, limit=limit, cursor=cursor)
    return JobList(data=[JobPublic.from_row(j) for j in page.items], next_cursor=page.next_cursor)


@router.get("/{job_id}", response_model=JobPublic)
def get_job(job_id: str, session: SessionDep) -> JobPublic:
    return JobPublic.from_row(crud.get_job(session=session, job_id=job_id))


@router.post("/{job_id}/cancel", response_model=JobPublic)
def cancel_job(job_id: str, session: SessionDep) -> JobPublic:
    """A queued job is cancelled at once, a running one between steps; a finished one stays."""
    return JobPublic.from_row(crud.request_cancel(session=session, job_id=job_id))


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "event stream"}},
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
