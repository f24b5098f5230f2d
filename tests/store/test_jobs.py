from __future__ import annotations

import base64
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from app.store import crud
from app.store.errors import InvalidCursor, NotFound
from app.store.models import Job

from .factories import running_job


def _make_stale(session: Session, job_id: str, age: timedelta = timedelta(hours=1)) -> None:
    old = datetime.now(UTC) - age
    session.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=old))
    session.commit()


def _race(session_factory: sessionmaker[Session], n: int, fn):
    """Run fn(session) in n threads released together; returns their results."""
    barrier = threading.Barrier(n)

    def one(_: int):
        with session_factory() as session:
            barrier.wait()
            return fn(session)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def test_create_job_is_queued(session: Session):
    job, created = crud.create_job(session=session, kind="dinm", spec={"case": "c01"})
    assert created
    fetched = crud.get_job(session=session, job_id=job.id)
    assert (fetched.status, fetched.progress, fetched.attempts) == ("queued", 0.0, 0)
    assert fetched.spec == {"case": "c01"}
    assert fetched.parent_name == "base" and fetched.version_name is None
    assert fetched.created_at.tzinfo is not None
    assert abs(fetched.created_at - datetime.now(UTC)) < timedelta(minutes=1)


def test_create_job_refuses_unknown_kind(session: Session):
    with pytest.raises(ValueError, match="kind"):
        crud.create_job(session=session, kind="nope", spec={})


def test_get_unknown_job(session: Session):
    with pytest.raises(NotFound):
        crud.get_job(session=session, job_id="00000000-0000-0000-0000-000000000000")


def test_create_job_is_idempotent(session: Session):
    first, created = crud.create_job(session=session, kind="dinm", spec={}, idempotency_key="k1")
    again, created_again = crud.create_job(
        session=session, kind="dinm", spec={"other": 1}, idempotency_key="k1"
    )
    other, _ = crud.create_job(session=session, kind="dinm", spec={}, idempotency_key="k2")
    plain1, _ = crud.create_job(session=session, kind="dinm", spec={})
    plain2, _ = crud.create_job(session=session, kind="dinm", spec={})
    assert created and not created_again
    assert again.id == first.id and again.spec == {}
    assert len({first.id, other.id, plain1.id, plain2.id}) == 4
    assert crud.count_jobs(session=session) == 4


def test_concurrent_creates_with_one_key_make_one_job(session_factory, session: Session):
    results = _race(
        session_factory,
        4,
        lambda s: crud.create_job(session=s, kind="dinm", spec={}, idempotency_key="race"),
    )
    assert len({job.id for job, _ in results}) == 1
    assert sum(created for _, created in results) == 1
    assert crud.count_jobs(session=session) == 1


def test_claim_only_a_queued_job(session: Session):
    job, _ = crud.create_job(session=session, kind="dinm", spec={})
    claimed = crud.claim_job(session=session, job_id=job.id, worker="w1")
    assert claimed is not None
    assert (claimed.status, claimed.attempts, claimed.worker) == ("running", 1, "w1")
    assert claimed.started_at is not None and claimed.heartbeat_at is not None
    assert claimed.started_at.tzinfo is not None
    assert crud.claim_job(session=session, job_id=job.id, worker="w2") is None
    assert crud.get_job(session=session, job_id=job.id).worker == "w1"


def test_concurrent_claims_have_one_winner(session_factory, session: Session):
    for _ in range(5):
        job, _ = crud.create_job(session=session, kind="dinm", spec={})
        results = _race(
            session_factory, 2, lambda s, j=job: crud.claim_job(session=s, job_id=j.id, worker="w")
        )
        assert sum(r is not None for r in results) == 1
        assert crud.get_job(session=session, job_id=job.id).attempts == 1


def test_progress_is_ignored_after_finish(session: Session):
    job = running_job(session)
    assert crud.update_progress(session=session, job_id=job.id, stage="tune", progress=0.5)
    assert crud.get_job(session=session, job_id=job.id).progress == 0.5
    assert crud.finish_job_failed(session=session, job_id=job.id, error={"message": "boom"})
    assert not crud.update_progress(session=session, job_id=job.id, stage="late", progress=0.9)
    assert not crud.heartbeat(session=session, job_id=job.id)
    after = crud.get_job(session=session, job_id=job.id)
    assert (after.status, after.stage, after.progress) == ("failed", "tune", 0.5)
    assert after.error == {"message": "boom"}
    assert not crud.finish_job_cancelled(session=session, job_id=job.id)


def test_progress_is_clamped(session: Session):
    job = running_job(session)
    crud.update_progress(session=session, job_id=job.id, stage="tune", progress=1.5)
    assert crud.get_job(session=session, job_id=job.id).progress == 1.0


def test_eval_job_succeeds_without_version(session: Session):
    job = running_job(session, kind="eval")
    assert crud.finish_job_evaluated(session=session, job_id=job.id, metrics={"DS": 12.0})
    done = crud.get_job(session=session, job_id=job.id)
    assert (done.status, done.metrics, done.result_version_id) == ("succeeded", {"DS": 12.0}, None)


def test_cancel_queued_job_at_once(session: Session):
    job, _ = crud.create_job(session=session, kind="dinm", spec={})
    cancelled = crud.request_cancel(session=session, job_id=job.id)
    assert cancelled.status == "cancelled" and cancelled.finished_at is not None
    assert crud.claim_job(session=session, job_id=job.id, worker="w") is None


def test_cancel_running_job_asks_its_worker(session: Session):
    job = running_job(session)
    assert not crud.is_cancel_requested(session=session, job_id=job.id)
    asked = crud.request_cancel(session=session, job_id=job.id)
    assert asked.status == "running" and asked.cancel_requested
    assert crud.is_cancel_requested(session=session, job_id=job.id)
    assert crud.finish_job_cancelled(session=session, job_id=job.id)
    assert crud.get_job(session=session, job_id=job.id).status == "cancelled"


def test_cancel_finished_job_changes_nothing(session: Session):
    job = running_job(session, kind="eval")
    crud.finish_job_evaluated(session=session, job_id=job.id, metrics={})
    assert crud.request_cancel(session=session, job_id=job.id).status == "succeeded"
    with pytest.raises(NotFound):
        crud.request_cancel(session=session, job_id="missing")


def test_cursor_pagination_walks_every_job_once(session: Session):
    ids = [crud.create_job(session=session, kind="dinm", spec={})[0].id for _ in range(7)]
    # Three jobs with one timestamp: the id breaks the tie.
    same = datetime(2030, 1, 1, tzinfo=UTC)
    session.execute(update(Job).where(Job.id.in_(ids[2:5])).values(created_at=same))
    session.commit()

    seen, cursor, pages = [], None, 0
    while True:
        page = crud.list_jobs(session=session, limit=2, cursor=cursor)
        seen += [job.id for job in page.items]
        pages += 1
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert pages == 4 and len(seen) == 7 and set(seen) == set(ids)
    jobs = [crud.get_job(session=session, job_id=i) for i in seen]
    keys = [(j.created_at, j.id) for j in jobs]
    assert keys == sorted(keys, reverse=True)


def test_list_jobs_filters_by_status(session: Session):
    running = running_job(session)
    crud.create_job(session=session, kind="dinm", spec={})
    page = crud.list_jobs(session=session, status="running")
    assert [j.id for j in page.items] == [running.id] and page.next_cursor is None
    assert crud.count_jobs(session=session, status="queued") == 1
    with pytest.raises(ValueError):
        crud.list_jobs(session=session, status="bogus")


@pytest.mark.parametrize(
    "cursor",
    [
        "garbage!!",
        "bm90IGpzb24",  # "not json"
        base64.urlsafe_b64encode(b'["2030-01-01T00:00:00", "x"]').decode(),  # naive time
        base64.urlsafe_b64encode(b'{"a": 1}').decode(),
    ],
)
def test_list_jobs_rejects_a_bad_cursor(session: Session, cursor: str):
    with pytest.raises(InvalidCursor):
        crud.list_jobs(session=session, cursor=cursor)


def test_requeue_stale_jobs(session: Session):
    stale = running_job(session)
    fresh = running_job(session)
    capped = running_job(session)
    cancelling = running_job(session)
    session.execute(update(Job).where(Job.id == capped.id).values(attempts=3))
    session.commit()
    crud.request_cancel(session=session, job_id=cancelling.id)
    for job in (stale, capped, cancelling):
        _make_stale(session, job.id)

    requeued = crud.requeue_stale_jobs(
        session=session, older_than=timedelta(minutes=5), max_attempts=3
    )
    assert requeued == [stale.id]
    status = {j.id: crud.get_job(session=session, job_id=j.id) for j in (stale, fresh, capped)}
    assert status[stale.id].status == "queued" and status[stale.id].worker is None
    assert status[fresh.id].status == "running"
    assert status[capped.id].status == "failed"
    assert status[capped.id].error["code"] == "attempts_exhausted"
    assert crud.get_job(session=session, job_id=cancelling.id).status == "cancelled"

    again = crud.claim_job(session=session, job_id=stale.id, worker="w2")
    assert again is not None and again.attempts == 2


def test_attempt_fences_a_superseded_worker(session: Session):
    first = running_job(session)
    _make_stale(session, first.id)
    crud.requeue_stale_jobs(session=session, older_than=timedelta(minutes=5), max_attempts=3)
    second = crud.claim_job(session=session, job_id=first.id, worker="w2")
    assert second is not None and second.attempts == 2
    assert not crud.update_progress(
        session=session, job_id=first.id, stage="x", progress=0.1, attempt=1
    )
    assert not crud.finish_job_failed(session=session, job_id=first.id, error={}, attempt=1)
    assert crud.update_progress(
        session=session, job_id=first.id, stage="x", progress=0.1, attempt=2
    )


def test_claim_steals_a_stale_job_until_the_cap(session: Session):
    job = running_job(session)
    steal = timedelta(minutes=5)
    assert crud.claim_job(session=session, job_id=job.id, worker="w2", steal_after=steal) is None
    _make_stale(session, job.id)
    stolen = crud.claim_job(
        session=session, job_id=job.id, worker="w2", steal_after=steal, max_attempts=2
    )
    assert stolen is not None and (stolen.worker, stolen.attempts) == ("w2", 2)
    _make_stale(session, job.id)
    assert (
        crud.claim_job(
            session=session, job_id=job.id, worker="w3", steal_after=steal, max_attempts=2
        )
        is None
    )
    failed = crud.get_job(session=session, job_id=job.id)
    assert failed.status == "failed" and failed.error["code"] == "attempts_exhausted"


def test_release_gives_the_claim_back_uncounted(session: Session):
    job = running_job(session)
    assert not crud.release_job(session=session, job_id=job.id, attempt=job.attempts + 1)
    assert crud.release_job(session=session, job_id=job.id, attempt=job.attempts)
    released = crud.get_job(session=session, job_id=job.id)
    assert (released.status, released.attempts, released.worker) == ("queued", 0, None)
    assert not crud.release_job(session=session, job_id=job.id, attempt=job.attempts)
    again = crud.claim_job(session=session, job_id=job.id, worker="w2", max_attempts=1)
    assert again is not None and again.attempts == 1
