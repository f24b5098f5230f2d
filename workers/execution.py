"""One job, start to finish, as a plain function: no Celery, no broker (the task only calls this).

claim -> read the spec (`app.job_spec`, as the API validated it) -> materialise the parent (base +
its chain's deltas) -> the edit (DINM or corpus unlearning) with its before/after report -> revert
the parent exactly -> write the version and its delta rows together with the job's success (one
transaction). An `eval` job runs its suites on the materialised version instead and attaches the
results to that version, again in the transaction that ends the job.

Outcomes (the return value, also logged): "succeeded", "failed", "cancelled", "skipped" (not
claimable: finished, cancelled, or running elsewhere), "superseded" (a newer claim took over while
this one ran; nothing more is written). Transient errors (database or broker down) give the claim
back and propagate, for the task to retry; every other error ends the job `failed`.

Deltas are stored against the BASE weights: each delta blob's fingerprint is that of the base
value of the one parameter it edits, computed after the parent chain was reverted, so
`apply_deltas(base, [v1, v2, v3])` checks every link of a chain against the same base.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.orm import Session, sessionmaker
from torch import nn

from app.chains import UnreadableChain, chain_deltas, read_chain
from app.job_spec import DinmJobCreate, EvalJobCreate, InvalidSpec, UnlearnJobCreate, read_spec
from app.logs import job_context
from app.ml.bias import filter_pairs, load_pairs
from app.ml.corpus import Document
from app.ml.deltas import Delta, adapter_rank, apply_deltas, fingerprint
from app.ml.errors import DeltaError, EditCancelled, InputError
from app.ml.export import adapter_rank_problem
from app.ml.pipeline import dinm_with_report, unlearn_with_report
from app.ml.suites import run_suites
from app.notify import publish_versions_changed
from app.settings import Settings
from app.store import crud
from app.store.errors import DuplicateVersionName, JobNotRunning, NotFound
from app.store.models import Job
from workers import errors
from workers.errors import TRANSIENT_ERRORS, JobInputError
from workers.monitor import JobMonitor, suite_spans
from workers.runtime import Runtime

log = logging.getLogger(__name__)


def execute_job(
    job_id: str,
    *,
    session_factory: sessionmaker[Session],
    runtime: Runtime,
    settings: Settings,
    worker_name: str,
) -> str:
    """Run the job `job_id` if it can be claimed; returns the outcome (see the module docstring)."""
    with job_context(job_id):
        job = _claim(job_id, session_factory, settings, worker_name)
        if job is None:
            log.info("job %s: not claimable (finished, cancelled or taken); skipped", job_id)
            return "skipped"
        log.info("job %s: attempt %d on %s", job_id, job.attempts, worker_name)
        start = time.perf_counter()
        monitor = JobMonitor(
            session_factory,
            job_id,
            job.attempts,
            heartbeat_s=settings.job_heartbeat_timeout_s / 4,
            time_limit_s=settings.job_soft_time_limit_s,
        )
        try:
            with monitor:
                outcome = _run(job, monitor, session_factory, runtime, settings)
        except TRANSIENT_ERRORS as exc:
            log.warning("job %s: transient error, giving the claim back: %s", job_id, exc)
            _release(session_factory, job_id, job.attempts)
            raise
        log.info("job %s: %s in %.2f s", job_id, outcome, time.perf_counter() - start)
        return outcome


def _claim(
    job_id: str, session_factory: sessionmaker[Session], settings: Settings, worker_name: str
) -> Job | None:
    with session_factory() as session:
        return crud.claim_job(
            session=session,
            job_id=job_id,
            worker=worker_name,
            steal_after=timedelta(seconds=settings.job_heartbeat_timeout_s),
            max_attempts=settings.job_max_attempts,
        )


def _run(
    job: Job,
    monitor: JobMonitor,
    session_factory: sessionmaker[Session],
    runtime: Runtime,
    settings: Settings,
) -> str:
    # Fenced to this attempt: when a newer claim has taken over, nothing is written.
    def fail(error: dict[str, Any]) -> str:
        with session_factory() as session:
            ours = crud.finish_job_failed(
                session=session, job_id=job.id, error=error, attempt=job.attempts
            )
        return "failed" if ours else "superseded"

    try:
        spec = read_spec(job.kind, job.spec)
        if isinstance(spec, EvalJobCreate):
            metrics = _evaluate(job, spec, monitor, session_factory, runtime, settings)
            with session_factory() as session:
                ours = crud.finish_job_evaluated(
                    session=session, job_id=job.id, metrics=metrics, attach=metrics["suites"],
                    attempt=job.attempts,
                )  # fmt: skip
            return "succeeded" if ours else "superseded"
        deltas, report = _edit(job, spec, monitor, session_factory, runtime, settings)
        if monitor.cancel_requested_now():
            raise EditCancelled(f"stopped before saving: {monitor.stop_reason}")
        monitor.set_stage("saving")
        with session_factory() as session:
            version = crud.finish_job_succeeded(
                session=session,
                job_id=job.id,
                base_model=runtime.model_name,
                base_fingerprint=runtime.base_fingerprint,
                metrics=report,
                deltas=deltas,
                version_name=spec.name,
                attempt=job.attempts,
            )
        log.info("job %s: version %s written", job.id, version.name)
        publish_versions_changed(settings.resolved_broker_url())  # serving engines load it now
        return "succeeded"
    except (EditCancelled, SoftTimeLimitExceeded):
        reason = monitor.stop_reason
        if reason == "superseded":
            return "superseded"
        if reason == "timeout" or reason is None:  # None: Celery's soft limit (prefork pool)
            return fail(errors.time_limit(settings.job_soft_time_limit_s))
        with session_factory() as session:
            ours = crud.finish_job_cancelled(session=session, job_id=job.id, attempt=job.attempts)
        return "cancelled" if ours else "superseded"
    except (JobInputError, InvalidSpec) as exc:
        log.info("job %s: invalid: %s", job.id, exc.message)
        return fail(errors.invalid_request(exc))
    except InputError as exc:  # found out while editing, e.g. params.layer out of range
        log.info("job %s: invalid: %s", job.id, exc)
        return fail(errors.invalid_request(JobInputError("invalid_input", str(exc))))
    except DuplicateVersionName as exc:
        return fail(
            errors.invalid_request(JobInputError("duplicate_version_name", str(exc), "name"))
        )
    except JobNotRunning:
        log.warning("job %s: no longer running in attempt %d; result dropped", job.id, job.attempts)
        return "superseded"
    except TRANSIENT_ERRORS:
        raise
    except Exception as exc:
        log.exception("job %s: failed", job.id)
        return fail(errors.internal_error(exc))


def _edit(
    job: Job,
    spec: DinmJobCreate | UnlearnJobCreate,
    monitor: JobMonitor,
    session_factory: sessionmaker[Session],
    runtime: Runtime,
    settings: Settings,
) -> tuple[list[crud.DeltaIn], dict[str, Any]]:
    """The edit on the materialised parent; returns the delta rows and the report."""
    lm = runtime.lm
    if isinstance(spec, UnlearnJobCreate):  # read before the parent is applied: may fail cheaply
        forget, retain = _corpora(spec, session_factory)
    with _materialised(job, monitor, session_factory, runtime) as parents:
        if isinstance(spec, DinmJobCreate):
            result, report = dinm_with_report(
                lm, spec.all_instances(), spec.params, judge=runtime.judge,
                max_new_tokens=settings.max_new_tokens, batch_size=settings.eval_batch_size,
                progress=monitor.progress, should_cancel=monitor.should_cancel,
            )  # fmt: skip
        else:
            pairs = filter_pairs(load_pairs(None), limit=settings.unlearn_bias_pairs_per_type)
            result, report = unlearn_with_report(
                lm, forget, retain, spec.method, spec.params, bias_pairs=pairs,
                batch_size=settings.eval_batch_size, progress=monitor.progress,
                should_cancel=monitor.should_cancel,
            )  # fmt: skip
    report["parent"] = spec.parent
    if settings.engine == "vllm":
        report["warnings"] = report.get("warnings", []) + _vllm_warnings(
            [*parents, result.delta], settings.vllm_max_lora_rank
        )
    return delta_rows(result.delta, lm.model), report


def _vllm_warnings(chain: list[Delta], max_lora_rank: int) -> list[str]:
    """Said when the version is made: the vLLM engine will not serve it (see vllm_engine)."""
    problem = adapter_rank_problem(adapter_rank(chain), max_lora_rank)
    return [] if problem is None else [f"the vLLM engine cannot serve this version: {problem}"]


def _evaluate(
    job: Job,
    spec: EvalJobCreate,
    monitor: JobMonitor,
    session_factory: sessionmaker[Session],
    runtime: Runtime,
    settings: Settings,
) -> dict[str, Any]:
    """The asked suites on the evaluated version (the job's parent; none: the base)."""
    lm = runtime.lm
    monitor.use_spans(suite_spans(list(spec.suites)))
    with _materialised(job, monitor, session_factory, runtime):
        params = spec.params
        results = run_suites(
            lm, spec.suites, judge=runtime.judge, instances=params.instances, texts=params.texts,
            bias_types=params.bias_types, limit=params.limit,
            max_new_tokens=settings.max_new_tokens, batch_size=settings.eval_batch_size,
            progress=monitor.progress,
        )  # fmt: skip
    return {"kind": "eval", "model": spec.model, "suites": results}


@contextmanager
def _materialised(
    job: Job, monitor: JobMonitor, session_factory: sessionmaker[Session], runtime: Runtime
) -> Iterator[list[Delta]]:
    """The base model with the job's parent chain (yielded) applied; exactly the base again on
    exit."""
    lm = runtime.lm
    base_fingerprint = runtime.base_fingerprint  # before any delta is applied
    monitor.set_stage("materialise")
    parents = _parent_deltas(session_factory, job.parent_version_id, base_fingerprint)
    try:
        handle = apply_deltas(lm.model, parents)
    except DeltaError as exc:
        raise JobInputError("invalid_parent", f"parent version: {exc}", "parent") from exc
    try:
        yield parents
    finally:
        handle.revert()  # back to the exact base weights, whatever happened


def _corpora(
    spec: UnlearnJobCreate, session_factory: sessionmaker[Session]
) -> tuple[list[Document], list[Document] | None]:
    """The forget and retain documents: inline, or read from the stored corpora."""

    def stored(corpus_id: str, field: str) -> list[Document]:
        try:
            with session_factory() as session:
                return crud.corpus_documents(session=session, corpus_id=corpus_id)
        except NotFound as exc:
            raise JobInputError("invalid_corpus", f"{field}: {exc}", field) from exc

    forget = spec.forget if spec.forget is not None else stored(spec.corpus_id, "corpus_id")
    retain = spec.retain
    if retain is None and spec.retain_corpus_id is not None:
        retain = stored(spec.retain_corpus_id, "retain_corpus_id")
    return forget, retain


def _parent_deltas(
    session_factory: sessionmaker[Session], parent_id: int | None, base_fingerprint: str
) -> list[Delta]:
    """The deltas of the parent's chain, root first (none for the base)."""
    if parent_id is None:
        return []
    try:
        with session_factory() as session:
            return chain_deltas(read_chain(session, parent_id, base_fingerprint=base_fingerprint))
    except (NotFound, UnreadableChain) as exc:
        raise JobInputError("invalid_parent", f"parent version: {exc}", "parent") from exc


def delta_rows(delta: Delta, base_model: nn.Module) -> list[crud.DeltaIn]:
    """One single-parameter delta per edited parameter, fingerprinted on `base_model`'s values
    (which must be the base weights: call this after reverting any parent chain)."""
    rows: list[crud.DeltaIn] = []
    for name in delta.params:
        update = delta.updates[name]
        single = Delta({name: update}, fingerprint(base_model, [name]), dict(delta.meta))
        rows.append(
            {
                "param": name,
                "encoding": update.encoding,
                "dtype": single.dtype,
                "shape": list(update.shape),
                "blob": single.to_bytes(),
            }
        )
    return rows


def _release(session_factory: sessionmaker[Session], job_id: str, attempt: int) -> None:
    """Give the claim back for the retry (best effort: the database may be what failed; then
    the stale-job reaper requeues the job once its heartbeat is old)."""
    try:
        with session_factory() as session:
            crud.release_job(session=session, job_id=job_id, attempt=attempt)
    except Exception as exc:
        log.warning("job %s: could not give the claim back (%s)", job_id, exc)
