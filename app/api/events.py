"""Server-sent events for one job: the row is polled in a worker thread (the event loop never
blocks on the database) and an event goes out whenever status, stage or progress change."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
from fastapi import Request
from sqlalchemy.orm import Session, sessionmaker

from app.api.schemas import JobPublic
from app.store import crud
from app.store.models import TERMINAL_STATUSES

POLL_S = 0.3
KEEPALIVE_S = 15.0


def format_event(event: str, data: Any) -> str:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def _read(sessions: sessionmaker[Session], job_id: str) -> dict[str, Any]:
    with sessions() as session:
        job = crud.get_job(session=session, job_id=job_id)
        return JobPublic.from_row(job).model_dump(mode="json")


async def job_events(
    request: Request, sessions: sessionmaker[Session], job_id: str, *, poll_s: float = POLL_S
) -> AsyncIterator[str]:
    """`progress` events while the job changes, then `done` with the final job JSON."""
    last: tuple[Any, ...] | None = None
    last_sent = time.monotonic()
    while not await request.is_disconnected():
        job = await anyio.to_thread.run_sync(_read, sessions, job_id)
        if job["status"] in TERMINAL_STATUSES:
            yield format_event("done", job)
            return
        state = (job["status"], job["stage"], job["progress"])
        if state != last:
            last, last_sent = state, time.monotonic()
            yield format_event("progress", job)
        elif time.monotonic() - last_sent > KEEPALIVE_S:
            last_sent = time.monotonic()
            yield ": keepalive\n\n"
        await anyio.sleep(poll_s)
