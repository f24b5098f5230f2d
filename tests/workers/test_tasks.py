"""The task's retry policy, the stale-job reaper and the progress monitor, without a worker."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from sqlalchemy import update
from sqlalchemy.exc import OperationalError

from app.ml.errors import EditCancelled
from app.settings import Settings
from app.store import crud
from app.store._types import utcnow
from app.store.models import Job
from tests.workers.helpers import get, submit
from workers import monitor as monitor_module
from workers import tasks
from workers.celery_app import BrokerUnavailable
from workers.main import StaleJobReaper
from workers.monitor import JobMonitor, suite_spans


@pytest.fixture
def context(session_factory, tmp_path):
    settings = Settings(home=tmp_path, job_max_retries=2, job_retry_backoff_s=0.01)
    context = tasks.WorkerContext(settings, session_factory, runtime=None, name="w")  # type: ignore[arg-type]
    tasks.install_context(context)
    yield context
    tasks.install_context(None)


def test_transient_errors_are_retried_up_to_the_cap_then_the_job_fails(
    context, session_factory, monkeypatch
):
    calls = []

    def down(job_id, **_kwargs):
        calls.append(job_id)
        raise OperationalError("SELECT 1", {}, Exception("connection refused"))

    monkeypatch.setattr(tasks, "execute_job", down)
    job_id = submit(session_factory)
    result = tasks.run_job.apply(args=[job_id])
    assert isinstance(result.result, OperationalError)
    assert calls == [job_id] * 3  # the first run and two retries
    job = get(session_factory, job_id)
    assert job.status == "failed" and job.error["code"] == "transient_errors"


def test_other_errors_are_not_retried(context, session_factory, monkeypatch):
    monkeypatch.setattr(tasks, "execute_job", lambda job_id, **_: "failed")
    assert tasks.run_job.apply(args=["x"]).result == "failed"


def _make_stale(session_factory, job_id: str) -> None:
    with session_factory() as session:
        crud.claim_job(session=session, job_id=job_id, worker="dead")
        stale = utcnow() - timedelta(minutes=5)
        session.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=stale))
        session.commit()


def test_reaper_requeues_stale_jobs_and_retries_enqueueing(session_factory, tmp_path):
    job_id = submit(session_factory)
    _make_stale(session_factory, job_id)
    sent, broker_up = [], False

    def enqueue(job: str) -> None:
        if not broker_up:
            raise BrokerUnavailable("down")
        sent.append(job)

    settings = Settings(home=tmp_path, job_heartbeat_timeout_s=60)
    reaper = StaleJobReaper(session_factory, settings, enqueue)
    assert reaper.sweep() == []
    job = get(session_factory, job_id)
    assert (job.status, job.stage, job.worker) == ("queued", "requeued", None)
    broker_up = True
    assert reaper.sweep() == [job_id] and sent == [job_id]
    assert reaper.sweep() == []


def test_progress_writes_are_throttled_and_cancel_is_noticed(session_factory, monkeypatch):
    job_id = submit(session_factory)
    with session_factory() as session:
        job = crud.claim_job(session=session, job_id=job_id, worker="w")
    writes = []
    real = crud.update_progress
    monkeypatch.setattr(
        monitor_module.crud,
        "update_progress",
        lambda **kw: writes.append((kw["stage"], round(kw["progress"], 3))) or real(**kw),
    )
    now = [0.0]
    monitor = JobMonitor(
        session_factory,
        job_id,
        job.attempts,
        heartbeat_s=60,
        time_limit_s=100,
        clock=lambda: now[0],
    )
    for step in range(100):  # 100 steps within 0.1 s: one write, at the stage change
        now[0] += 0.001
        monitor.progress("tune", step / 100)
    now[0] += 0.6
    monitor.progress("tune", 1.0)  # 0.5 s later: written
    monitor.progress("eval-after", 0.0)  # a new stage: written at once
    assert writes == [("tune", 0.3), ("tune", 0.75), ("eval-after", 0.75)]
    assert get(session_factory, job_id).stage == "eval-after"
    with session_factory() as session:
        crud.request_cancel(session=session, job_id=job_id)
    now[0] += 1.1
    with pytest.raises(EditCancelled):
        monitor.progress("eval-after", 0.5)
    assert monitor.stop_reason == "cancel"


def test_heartbeat_thread_beats_and_notices_a_takeover(session_factory):
    job_id = submit(session_factory)
    with session_factory() as session:
        job = crud.claim_job(session=session, job_id=job_id, worker="w")
    first_beat = job.heartbeat_at
    monitor = JobMonitor(session_factory, job_id, job.attempts, heartbeat_s=0.05, time_limit_s=60)
    with monitor:
        wait_until(lambda: get(session_factory, job_id).heartbeat_at > first_beat)
        with session_factory() as session:  # another worker takes the job over
            stolen = crud.claim_job(
                session=session, job_id=job_id, worker="other", steal_after=timedelta(seconds=-1)
            )
        assert stolen is not None and stolen.attempts == 2
        wait_until(lambda: monitor.stop_reason == "superseded")
    assert monitor.should_cancel()


def wait_until(condition, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_every_kind_of_job_moves_its_overall_progress(session_factory):
    job_id = submit(session_factory)
    with session_factory() as session:
        job = crud.claim_job(session=session, job_id=job_id, worker="w")
    monitor = JobMonitor(session_factory, job_id, job.attempts, heartbeat_s=60, time_limit_s=100)
    overall = []
    for stage, fraction in [("eval-before", 0.5), ("prepare", 1.0), ("unlearn", 0.5),
                            ("eval-after", 1.0)]:  # fmt: skip
        monitor.progress(stage, fraction)
        overall.append(round(get(session_factory, job_id).progress, 3))
    assert overall == [0.125, 0.3, 0.525, 1.0]  # an unlearning job
    eval_job = submit(session_factory)
    with session_factory() as session:
        job = crud.claim_job(session=session, job_id=eval_job, worker="w")
    monitor = JobMonitor(session_factory, eval_job, job.attempts, heartbeat_s=60, time_limit_s=100)
    monitor.use_spans(suite_spans(["safeedit", "bias"]))
    monitor.progress("eval-safeedit", 0.5)
    assert round(get(session_factory, eval_job).progress, 3) == 0.25
    monitor.progress("eval-bias", 0.5)
    assert round(get(session_factory, eval_job).progress, 3) == 0.75
