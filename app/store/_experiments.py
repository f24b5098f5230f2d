"""A/B experiments and their outcomes: one row per served response, judged after the fact.

Per-arm results are aggregated here in SQL (counts and sums); the intervals are computed by
`app.experiments.stats` from these counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import case, func, select, update
from sqlalchemy.orm import Session

from app.store._rows import MAX_PAGE, add_unique
from app.store._types import utcnow
from app.store.errors import DuplicateExperimentName, ExperimentStopped, NotFound
from app.store.models import Experiment, ExperimentOutcome


def create_experiment(
    *,
    session: Session,
    name: str,
    arms: list[dict[str, Any]],
    judge: str,
    keep_text: bool = False,
    api_key_id: int | None = None,
) -> Experiment:
    experiment = Experiment(
        name=name, arms=arms, judge=judge, keep_text=keep_text, api_key_id=api_key_id
    )
    add_unique(
        session,
        experiment,
        clash=lambda: (
            DuplicateExperimentName(name)
            if experiment_name_exists(session=session, name=name)
            else None
        ),
    )
    return experiment


def running_experiments_serving(*, session: Session, models: list[str]) -> list[str]:
    """The names of the running experiments with an arm on one of `models`, oldest first."""
    wanted = set(models)
    running = session.scalars(
        select(Experiment).where(Experiment.status == "running").order_by(Experiment.id)
    )
    return [e.name for e in running if any(arm.get("model") in wanted for arm in e.arms)]


def experiment_name_exists(*, session: Session, name: str) -> bool:
    return session.scalar(select(Experiment.id).where(Experiment.name == name)) is not None


def get_experiment(*, session: Session, name: str) -> Experiment:
    experiment = session.scalars(select(Experiment).where(Experiment.name == name)).one_or_none()
    if experiment is None:
        raise NotFound(f"no experiment named {name!r}")
    return experiment


def list_experiments(
    *, session: Session, status: str | None = None, limit: int = 100
) -> list[Experiment]:
    """Newest first."""
    query = select(Experiment).order_by(Experiment.created_at.desc(), Experiment.id.desc())
    if status is not None:
        query = query.where(Experiment.status == status)
    return list(session.scalars(query.limit(min(limit, MAX_PAGE))))


def stop_experiment(*, session: Session, name: str, winner: str | None) -> Experiment:
    """Stop a running experiment; from then on `winner` (an arm's model, or None: the base)
    takes its traffic. ExperimentStopped when it is stopped already."""
    experiment = get_experiment(session=session, name=name)
    stopped = session.execute(
        update(Experiment)
        .where(Experiment.id == experiment.id, Experiment.status == "running")
        .values(status="stopped", winner=winner, stopped_at=utcnow())
    )
    if stopped.rowcount != 1:  # type: ignore[attr-defined]
        session.rollback()
        raise ExperimentStopped(name)
    session.commit()
    session.refresh(experiment)
    return experiment


def record_outcome(
    *,
    session: Session,
    experiment_id: int,
    response_id: str,
    arm: str,
    user_hash: str | None,
    latency_ms: float,
    prompt_tokens: int,
    completion_tokens: int,
    finish_reason: str | None,
    prompt: str | None = None,
    response: str | None = None,
) -> ExperimentOutcome:
    """A served response's row, unjudged (`prompt` and `response`: only if the experiment keeps
    text)."""
    outcome = ExperimentOutcome(
        experiment_id=experiment_id,
        response_id=response_id,
        arm=arm,
        user_hash=user_hash,
        latency_ms=latency_ms,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        finish_reason=finish_reason,
        prompt=prompt,
        response=response,
    )
    session.add(outcome)
    session.commit()
    return outcome


def judge_outcome(
    *,
    session: Session,
    response_id: str,
    unsafe: bool | None = None,
    unsafe_score: float | None = None,
    refused: bool | None = None,
    error: str | None = None,
) -> None:
    """The verdict on a recorded response, or with `error` why it has none."""
    values: dict[str, Any] = (
        {"judge_error": error[:500]}
        if error is not None
        else {"unsafe": unsafe, "unsafe_score": unsafe_score, "refused": refused,
              "judged_at": utcnow(), "judge_error": None}
    )  # fmt: skip
    session.execute(
        update(ExperimentOutcome).where(ExperimentOutcome.response_id == response_id).values(values)
    )
    session.commit()


def set_feedback(
    *, session: Session, experiment_id: int, response_id: str, score: float
) -> ExperimentOutcome:
    """The client's score of one response of this experiment (a later score replaces it)."""
    query = select(ExperimentOutcome).where(
        ExperimentOutcome.experiment_id == experiment_id,
        ExperimentOutcome.response_id == response_id,
    )
    outcome = session.scalars(query).one_or_none()
    if outcome is None:
        raise NotFound(f"no response {response_id!r} in this experiment")
    outcome.feedback = score
    outcome.feedback_at = utcnow()
    session.commit()
    return outcome


@dataclass(frozen=True)
class ArmCounts:
    arm: str
    requests: int
    judged: int
    unsafe: int
    refused: int
    judge_errors: int
    completion_tokens: int
    feedback_count: int
    feedback_sum: float
    latencies_ms: list[float]


def _true(column: Any) -> Any:
    return func.coalesce(func.sum(case((column.is_(True), 1), else_=0)), 0)


def arm_counts(*, session: Session, experiment_id: int) -> dict[str, ArmCounts]:
    """Per arm (those with at least one response): counts, sums and every latency."""
    rows = session.execute(
        select(
            ExperimentOutcome.arm,
            func.count(),
            func.count(ExperimentOutcome.judged_at),
            _true(ExperimentOutcome.unsafe),
            _true(ExperimentOutcome.refused),
            func.count(ExperimentOutcome.judge_error),
            func.coalesce(func.sum(ExperimentOutcome.completion_tokens), 0),
            func.count(ExperimentOutcome.feedback),
            func.coalesce(func.sum(ExperimentOutcome.feedback), 0.0),
        )
        .where(ExperimentOutcome.experiment_id == experiment_id)
        .group_by(ExperimentOutcome.arm)
    ).all()
    latencies: dict[str, list[float]] = {}
    for arm, latency in session.execute(
        select(ExperimentOutcome.arm, ExperimentOutcome.latency_ms).where(
            ExperimentOutcome.experiment_id == experiment_id
        )
    ):
        latencies.setdefault(arm, []).append(latency)
    return {
        arm: ArmCounts(
            arm=arm,
            requests=int(n),
            judged=int(judged),
            unsafe=int(unsafe),
            refused=int(refused),
            judge_errors=int(errors),
            completion_tokens=int(tokens),
            feedback_count=int(feedback_n),
            feedback_sum=float(feedback_sum),
            latencies_ms=latencies.get(arm, []),
        )
        for arm, n, judged, unsafe, refused, errors, tokens, feedback_n, feedback_sum in rows
    }


def list_outcomes(
    *, session: Session, experiment_id: int, limit: int = 100
) -> list[ExperimentOutcome]:
    """Newest first."""
    query = (
        select(ExperimentOutcome)
        .where(ExperimentOutcome.experiment_id == experiment_id)
        .order_by(ExperimentOutcome.id.desc())
        .limit(min(limit, MAX_PAGE))
    )
    return list(session.scalars(query))
