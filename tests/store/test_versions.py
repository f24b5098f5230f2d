from __future__ import annotations

import hashlib
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from app.store import _job_results, crud
from app.store.errors import (
    BaseFingerprintMismatch,
    DeltaChecksumError,
    DuplicateVersionName,
    InvalidVersionName,
    JobNotRunning,
    NotFound,
    VersionHasChildren,
)
from app.store.models import DeltaRow, Version

from .factories import FINGERPRINT, delta, running_job, version


def _counts(session: Session) -> tuple[int, int]:
    versions = session.scalar(select(func.count()).select_from(Version))
    deltas = session.scalar(select(func.count()).select_from(DeltaRow))
    return versions, deltas


def _succeed(session: Session, job_id: str, **kwargs):
    kwargs.setdefault("deltas", [delta()])
    return crud.finish_job_succeeded(
        session=session,
        job_id=job_id,
        base_model="tiny",
        base_fingerprint=FINGERPRINT,
        metrics={"DS": 1.0},
        **kwargs,
    )


def test_success_writes_version_deltas_and_job(session: Session):
    parent = version(session)
    job = running_job(session, parent_version_id=parent.id)
    made = _succeed(session, job.id, deltas=[delta("b.weight"), delta("a.weight", b"xyz")])
    assert (made.parent_id, made.job_id, made.kind) == (parent.id, job.id, "dinm")
    assert made.parent_name == parent.name and made.metrics == {"DS": 1.0}
    done = crud.get_job(session=session, job_id=job.id)
    assert (done.status, done.progress, done.result_version_id) == ("succeeded", 1.0, made.id)
    assert done.version_name == made.name and done.parent_name == parent.name
    assert done.metrics == {"DS": 1.0}
    assert crud.load_delta_blobs(session=session, version_id=made.id) == [
        ("a.weight", b"xyz"),
        ("b.weight", b"safetensors-bytes"),
    ]


def test_default_names_count_up(session: Session):
    assert [version(session).name for _ in range(3)] == ["v1", "v2", "v3"]
    version(session, name="v10")
    version(session, name="my-edit")
    assert version(session).name == "v11"


@pytest.mark.parametrize("name", ["base", "latest", "Latest", "", "a/b", "-x", "x" * 65])
def test_reserved_and_malformed_names_are_refused(session: Session, name: str):
    job = running_job(session)
    with pytest.raises(InvalidVersionName):
        _succeed(session, job.id, version_name=name)
    assert _counts(session) == (0, 0)


def test_duplicate_name_writes_nothing(session: Session):
    version(session, name="edit")
    job = running_job(session)
    with pytest.raises(DuplicateVersionName):
        _succeed(session, job.id, version_name="edit", deltas=[delta("a"), delta("b")])
    assert _counts(session) == (1, 1)
    still = crud.get_job(session=session, job_id=job.id)
    assert (still.status, still.result_version_id) == ("running", None)
    assert _succeed(session, job.id, version_name="edit-2").name == "edit-2"


def test_failure_mid_transaction_writes_nothing(session: Session, monkeypatch):
    def add_one_then_fail(session, version_id, rows):
        session.add(DeltaRow(version_id=version_id, **rows[0]))
        session.flush()
        raise RuntimeError("disk full")

    monkeypatch.setattr(_job_results, "_add_delta_rows", add_one_then_fail)
    job = running_job(session)
    with pytest.raises(RuntimeError, match="disk full"):
        _succeed(session, job.id, deltas=[delta("a"), delta("b")])
    assert _counts(session) == (0, 0)
    still = crud.get_job(session=session, job_id=job.id)
    assert (still.status, still.result_version_id, still.metrics) == ("running", None, None)


def test_only_a_running_job_can_succeed(session: Session):
    queued, _ = crud.create_job(session=session, kind="dinm", spec={})
    with pytest.raises(JobNotRunning):
        _succeed(session, queued.id)
    failed = running_job(session)
    crud.finish_job_failed(session=session, job_id=failed.id, error={})
    with pytest.raises(JobNotRunning):
        _succeed(session, failed.id)
    superseded = running_job(session)
    with pytest.raises(JobNotRunning):
        _succeed(session, superseded.id, attempt=superseded.attempts + 1)
    with pytest.raises(NotFound):
        _succeed(session, "missing")
    assert _counts(session) == (0, 0)


def test_concurrent_successes_get_distinct_default_names(session_factory, session: Session):
    jobs = [running_job(session) for _ in range(4)]
    barrier = threading.Barrier(len(jobs))

    def finish(job_id: str) -> str:
        with session_factory() as s:
            barrier.wait()
            return _succeed(s, job_id).name

    with ThreadPoolExecutor(len(jobs)) as pool:
        names = list(pool.map(finish, [j.id for j in jobs]))
    assert sorted(names) == ["v1", "v2", "v3", "v4"]


def test_checksum_is_verified_on_read(session: Session):
    made = version(session, deltas=[delta("a"), delta("b")])
    assert len(crud.load_delta_blobs(session=session, version_id=made.id)) == 2
    session.execute(
        text("UPDATE deltas SET blob = :blob WHERE version_id = :id AND param = 'b'"),
        {"blob": b"safetensors-bytez", "id": made.id},
    )
    session.commit()
    with pytest.raises(DeltaChecksumError, match=f"{made.name}.*'b'") as caught:
        crud.load_delta_blobs(session=session, version_id=made.id)
    assert (caught.value.version, caught.value.param) == (made.name, "b")


def test_fingerprint_is_checked_when_given(session: Session):
    made = version(session)
    assert crud.load_delta_blobs(session=session, version_id=made.id, base_fingerprint=FINGERPRINT)
    with pytest.raises(BaseFingerprintMismatch):
        crud.load_delta_blobs(session=session, version_id=made.id, base_fingerprint="0" * 64)


def test_delta_summary(session: Session):
    blobs = {"b": b"22", "a": b"1"}
    dense = version(session, deltas=[delta(p, b) for p, b in blobs.items()])
    mixed = version(session, deltas=[delta("a"), delta("c", encoding="lowrank")])
    summary = crud.delta_summary(session=session, version_id=dense.id)
    shas = "".join(hashlib.sha256(blobs[p]).hexdigest() for p in ("a", "b"))
    assert summary == {
        "params": ["a", "b"],
        "bytes": 3,
        "encoding": "dense",
        "sha256": hashlib.sha256(shas.encode()).hexdigest(),
    }
    assert crud.delta_summary(session=session, version_id=mixed.id)["encoding"] == "mixed"
    both = crud.delta_summaries(session=session, version_ids=[dense.id, mixed.id])
    assert both[dense.id] == summary


def test_latest_skips_retired(session: Session):
    with pytest.raises(NotFound):
        crud.get_version(session=session, name="latest")
    v1 = version(session)
    v2 = version(session)
    assert crud.get_version(session=session, name="latest").id == v2.id
    crud.retire_version(session=session, name="v2")
    assert crud.get_version(session=session, name="latest").id == v1.id
    with pytest.raises(NotFound):
        crud.get_version(session=session, name="v2")
    assert crud.get_version(session=session, name="v2", include_retired=True).retired
    assert [v.name for v in crud.list_versions(session=session)] == ["v1"]
    assert [v.name for v in crud.list_versions(session=session, include_retired=True)] == [
        "v1",
        "v2",
    ]
    assert crud.version_name_exists(session=session, name="v2")
    with pytest.raises(NotFound):
        crud.get_version(session=session, name="base")


def test_retire_with_children_refused_cascade_retires_subtree(session: Session):
    v1 = version(session)
    v2 = version(session, parent=v1)
    v3 = version(session, parent=v2)
    other = version(session)
    with pytest.raises(VersionHasChildren) as caught:
        crud.retire_version(session=session, name="v1")
    assert caught.value.children == ["v2", "v3"]
    assert not crud.get_version(session=session, name="v1").retired

    retired = crud.retire_version(session=session, name="v1", cascade=True)
    assert [v.name for v in retired] == ["v1", "v2", "v3"] and all(v.retired for v in retired)
    assert [v.name for v in crud.list_versions(session=session)] == [other.name]
    assert crud.get_version(session=session, name="latest").id == other.id
    with pytest.raises(NotFound):
        crud.retire_version(session=session, name="v1")
    with pytest.raises(InvalidVersionName):
        crud.retire_version(session=session, name="latest")
    assert v3.id in {v.id for v in retired}


def test_leaf_retires_without_cascade(session: Session):
    v1 = version(session)
    v2 = version(session, parent=v1)
    assert [v.name for v in crud.live_children(session=session, version_id=v1.id)] == ["v2"]
    assert [v.name for v in crud.retire_version(session=session, name=v2.name)] == ["v2"]
    assert crud.live_children(session=session, version_id=v1.id) == []
    assert [v.name for v in crud.retire_version(session=session, name="v1")] == ["v1"]


def test_version_chain_is_root_first(session: Session):
    v1 = version(session)
    v2 = version(session, parent=v1)
    v3 = version(session, parent=v2)
    chain = crud.version_chain(session=session, version_id=v3.id)
    assert [v.name for v in chain] == ["v1", "v2", "v3"]
    assert [v.name for v in crud.version_chain(session=session, version_id=v1.id)] == ["v1"]
    with pytest.raises(NotFound):
        crud.version_chain(session=session, version_id=10_000)


def test_chain_blobs_are_root_first_with_each_versions_checksum(session: Session):
    v1 = version(session, name="a", deltas=[delta("x.weight", b"one")])
    v2 = version(session, name="b", parent=v1, deltas=[delta("y.weight", b"two")])
    links = crud.load_chain_blobs(session=session, version_id=v2.id)
    assert [(link["name"], link["retired"], link["blobs"]) for link in links] == [
        ("a", False, [("x.weight", b"one")]),
        ("b", False, [("y.weight", b"two")]),
    ]
    for link, made in zip(links, (v1, v2), strict=True):
        assert link["sha256"] == crud.delta_summary(session=session, version_id=made.id)["sha256"]
    with pytest.raises(BaseFingerprintMismatch):
        crud.load_chain_blobs(session=session, version_id=v2.id, base_fingerprint="0" * 64)
