"""A worker SIGKILLed mid-edit: the job is requeued (reaper) or redelivered, and completes on a
new worker, or fails at the attempt cap. Never a version without its delta."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from app.store import crud
from tests.workers.conftest import MODES, Service
from tests.workers.helpers import submit, version_deltas, wait_for, wait_terminal
from workers.celery_app import enqueue_job

# Long enough to be killed mid-tune (~2.5 s of steps on the tiny model; the kill comes within
# 0.05 s of the first tune progress), short enough that the second attempt redoes it quickly.
LONG = {"steps": 300, "lr": 1e-3, "stop_loss": 0, "preset": "contrastive"}


def _kill_mid_edit(service: Service, **env: str) -> str:
    first = service.start_worker(**env)
    first.wait_ready()
    job_id = submit(service.sessions, params=LONG)
    enqueue_job(job_id, app=service.app)
    wait_for(service.sessions, job_id, lambda j: j.stage == "tune" and j.progress > 0)
    first.kill()
    with service.sessions() as session:
        job = crud.get_job(session=session, job_id=job_id)
        assert job.status == "running" and crud.list_versions(session=session) == []
    service.start_worker(**env)
    return job_id


@pytest.mark.parametrize("mode", MODES)
def test_killed_worker_job_completes_on_a_new_worker(make_service: Callable[..., Service], mode):
    service = make_service(mode)
    job_id = _kill_mid_edit(service)
    job = wait_terminal(service.sessions, job_id, timeout=120)
    assert job.status == "succeeded", job.error
    assert job.attempts == 2
    with service.sessions() as session:
        (version,) = crud.list_versions(session=session)
    assert version.job_id == job_id
    (delta,) = version_deltas(service.sessions, version.id)  # whole and checksummed
    assert delta.params == [version.metrics["param"]]


def test_killed_worker_at_the_attempt_cap_fails_the_job(make_service: Callable[..., Service]):
    service = make_service("embedded")
    job_id = _kill_mid_edit(service, DETOX_JOB_MAX_ATTEMPTS="1")
    job = wait_terminal(service.sessions, job_id, timeout=120)
    assert job.status == "failed" and job.attempts == 1
    assert job.error["code"] == "attempts_exhausted"
    with service.sessions() as session:
        assert crud.list_versions(session=session) == []
