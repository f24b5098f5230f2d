"""Jobs through a real worker subprocess: PostgreSQL + Redis, and the embedded default."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import redis
import torch

from app.ml.deltas import apply_deltas
from app.ml.models import load_model
from app.store import crud
from tests.instances import CASE_ID, safeedit_instance
from tests.workers.conftest import MODES, REDIS_URL, Service
from tests.workers.helpers import (
    chain_deltas,
    expected_sum,
    submit,
    version_deltas,
    wait_for,
    wait_terminal,
    weights,
)
from workers.celery_app import enqueue_job

LONG = {"steps": 1000, "lr": 1e-3, "stop_loss": 0}  # a few seconds on the tiny model


@pytest.fixture(scope="module", params=MODES)
def service(
    request: pytest.FixtureRequest, make_service: Callable[[str], Service]
) -> Iterator[Service]:
    """One service and one worker for the whole module (per mode)."""
    service = make_service(request.param)
    service.start_worker().wait_ready()
    yield service
    service.kill_all()  # a warm shutdown takes 3-6 s and nothing follows it


def run_job(service: Service, **spec) -> str:
    job_id = submit(service.sessions, **spec)
    enqueue_job(job_id, app=service.app)
    return job_id


def test_job_lifecycle_ends_with_a_version_whose_delta_applies(service: Service):
    job_id = run_job(service, name=f"life-{service.mode}")
    job = wait_terminal(service.sessions, job_id)
    assert job.status == "succeeded", job.error
    assert job.attempts == 1 and job.worker.startswith("detox-") and job.progress == 1.0
    with service.sessions() as session:
        version = crud.get_version(session=session, name=f"life-{service.mode}")
    assert version.job_id == job_id and version.metrics["case"] == CASE_ID
    deltas = version_deltas(service.sessions, version.id)  # sha256 verified
    lm = load_model(str(service.model_dir), device="cpu")
    base = weights(lm.model)
    apply_deltas(lm.model, deltas)  # fingerprints verified against the base
    changed = [n for n, p in lm.model.named_parameters() if not torch.equal(base[n], p)]
    assert changed == deltas[0].params


def test_cancel_mid_job_ends_cancelled_without_a_version(service: Service):
    job_id = run_job(service, params=LONG)
    wait_for(service.sessions, job_id, lambda j: j.stage == "tune" and j.progress > 0)
    with service.sessions() as session:
        crud.request_cancel(session=session, job_id=job_id)
    job = wait_terminal(service.sessions, job_id, timeout=30)
    assert job.status == "cancelled" and job.result_version_id is None
    with service.sessions() as session:
        assert all(v.job_id != job_id for v in crud.list_versions(session=session))


@pytest.mark.parametrize(
    "spec, param",
    [
        ({"params": {"lr": 5}}, "params.lr"),
        (
            {"instance": safeedit_instance(without=["unsafe generation"])},
            "instance.unsafe generation",
        ),
    ],
)
def test_bad_input_fails_at_once(service: Service, spec, param):
    job_id = run_job(service, **spec)
    job = wait_terminal(service.sessions, job_id)
    assert job.status == "failed" and job.attempts == 1
    assert job.error["type"] == "invalid_request_error" and job.error["param"] == param
    assert param.split(".")[-1] in job.error["message"]


def test_stacked_versions_materialise_as_base_plus_every_delta(service: Service):
    parent = None
    for layer in (1, 1, 2):  # the same parameter twice, then another one
        # The default (broad) edit without its instance steps: those only tune the same
        # parameters longer (each after a greedy check of the instance: ~8 s a job here).
        params = {"steps": 3, "lr": 1e-2, "layer": layer, "instance_steps": 0}
        job_id = run_job(service, parent=parent, params=params)
        job = wait_terminal(service.sessions, job_id)
        assert job.status == "succeeded", job.error
        parent = job.result_version_id
    with service.sessions() as session:
        chain = crud.version_chain(session=session, version_id=parent)
    assert [v.parent_id for v in chain] == [None, chain[0].id, chain[1].id]
    deltas = chain_deltas(service.sessions, parent)
    lm = load_model(str(service.model_dir), device="cpu")
    base = weights(lm.model)
    apply_deltas(lm.model, deltas)
    want = expected_sum(base, deltas)
    # The default edit is low-rank: B @ A added in place rounds apart from B @ A added after.
    for name, value in lm.model.named_parameters():
        torch.testing.assert_close(value, want[name], rtol=1e-6, atol=1e-6)


def _publish_undecodable(service: Service) -> None:
    """A message that is not JSON, ahead of the next job's, as a foreign or crashed producer
    leaves it."""
    if service.mode == "embedded":
        queue_folder = service.settings.broker_folders()["data_folder_in"]
        (queue_folder / "00000000000000000000_garbage.edits.msg").write_bytes(b'{"body": ')
    else:
        client = redis.Redis.from_url(REDIS_URL)
        client.lpush("edits", b'{"body": ')
        client.close()


def test_an_undecodable_message_does_not_stop_the_worker(service: Service):
    _publish_undecodable(service)
    job_id = run_job(service, params={"steps": 2, "instance_steps": 0})
    job = wait_terminal(service.sessions, job_id)
    assert job.status == "succeeded", job.error
    assert all(worker.process.poll() is None for worker in service.workers)
    assert any("skipped an undecodable broker message" in w.output() for w in service.workers)
