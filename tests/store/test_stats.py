from __future__ import annotations

from sqlalchemy.orm import Session

from app.store import crud

from .factories import running_job


def test_job_counts_and_finished_run_times(session: Session):
    crud.create_job(session=session, kind="eval", spec={"kind": "eval"})
    done = running_job(session)
    crud.finish_job_failed(session=session, job_id=done.id, error={"code": "x"})
    running_job(session)
    assert crud.job_counts(session=session) == {
        ("eval", "queued"): 1,
        ("dinm", "failed"): 1,
        ("dinm", "running"): 1,
    }
    [(kind, started, finished)] = crud.finished_job_times(session=session)
    assert kind == "dinm" and started <= finished
