"""Jobs and checks shared by the worker tests (in-process and subprocess)."""

from __future__ import annotations

import time
from typing import Any

import torch
from sqlalchemy.orm import Session, sessionmaker
from torch import nn

from app.ml.deltas import Delta
from app.store import crud
from app.store.models import Job
from tests.instances import safeedit_instance

FAST = {"steps": 4, "lr": 1e-2, "preset": "contrastive"}
TERMINAL = ("succeeded", "failed", "cancelled")


def dinm_spec(**overrides: Any) -> dict[str, Any]:
    instance = safeedit_instance()
    return {"kind": "dinm", "parent": "base", "instance": instance, "params": FAST} | overrides


def submit(
    sessions: sessionmaker[Session],
    *,
    parent: int | None = None,
    kind: str = "dinm",
    **spec: Any,
) -> str:
    with sessions() as session:
        job, created = crud.create_job(
            session=session, kind=kind, spec=dinm_spec(**spec), parent_version_id=parent
        )
    assert created
    return job.id


def get(sessions: sessionmaker[Session], job_id: str) -> Job:
    with sessions() as session:
        return crud.get_job(session=session, job_id=job_id)


def wait_for(
    sessions: sessionmaker[Session], job_id: str, predicate: Any, *, timeout: float = 60
) -> Job:
    """Poll the job row until `predicate(job)` holds."""
    deadline = time.monotonic() + timeout
    while True:
        job = get(sessions, job_id)
        if predicate(job):
            return job
        if time.monotonic() > deadline:
            raise AssertionError(
                f"job {job_id} still {job.status}/{job.stage} ({job.progress:.2f}) after "
                f"{timeout} s; error={job.error}"
            )
        time.sleep(0.05)


def wait_terminal(sessions: sessionmaker[Session], job_id: str, *, timeout: float = 60) -> Job:
    return wait_for(sessions, job_id, lambda job: job.status in TERMINAL, timeout=timeout)


def version_deltas(sessions: sessionmaker[Session], version_id: int) -> list[Delta]:
    """The version's own deltas, loaded the way a reader would (sha256 verified)."""
    with sessions() as session:
        blobs = crud.load_delta_blobs(session=session, version_id=version_id)
    return [Delta.from_bytes(blob) for _, blob in blobs]


def chain_deltas(sessions: sessionmaker[Session], version_id: int) -> list[Delta]:
    with sessions() as session:
        chain = crud.version_chain(session=session, version_id=version_id)
    return [delta for version in chain for delta in version_deltas(sessions, version.id)]


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def expected_sum(base: dict[str, torch.Tensor], deltas: list[Delta]) -> dict[str, torch.Tensor]:
    """Base weights plus every delta's dense update, in float32."""
    out = {name: value.float().clone() for name, value in base.items()}
    for delta in deltas:
        for name, update in delta.updates.items():
            out[name] += update.dense().float()
    return out
