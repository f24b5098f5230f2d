"""Experiments: create, stop, feedback, outcomes and results with their intervals."""

from __future__ import annotations

import math
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.experiments.outcomes import JudgeName
from app.store.crud import NAME_PATTERN
from app.store.models import Experiment, ExperimentOutcome

MAX_ARMS = 8
MAX_FEEDBACK = 1e6


class ArmSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str = Field(
        min_length=1, max_length=64, description='"base", a live version, or "latest" (pinned)'
    )
    weight: float = Field(1.0, ge=0, le=1e6, description="relative share of the traffic")


class ExperimentCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str = Field(pattern=f"^{NAME_PATTERN}$", description='routed to as model "exp:<name>"')
    arms: list[ArmSpec] = Field(min_length=2, max_length=MAX_ARMS)
    judge: JudgeName = Field(
        "service",
        description='"service": the server\'s DETOX_JUDGE; "offline": the newest offline judge '
        '(stored and shown as its version, "offline/3"); "offline/1", "offline/2", "offline/3": '
        'that version; "none": outcomes are not judged',
    )
    keep_text: bool = Field(
        False, description="store each prompt and response with its outcome (default: no text)"
    )

    @field_validator("arms")
    @classmethod
    def _distinct_weighted(cls, arms: list[ArmSpec]) -> list[ArmSpec]:
        models = [arm.model for arm in arms]
        if len(set(models)) != len(models):
            raise ValueError("each arm must name a different model")
        if not sum(arm.weight for arm in arms) > 0:
            raise ValueError("the arms' weights must add up to more than 0")
        return arms


class ExperimentPublic(BaseModel):
    name: str
    model: str = Field(description='what to send as `model`: "exp:<name>"')
    status: Literal["running", "stopped"]
    arms: list[ArmSpec]
    judge: str
    keep_text: bool
    winner: str | None = Field(description="once stopped: the arm that serves all its traffic")
    serves: str | None = Field(description="once stopped: the model its traffic goes to")
    created_at: datetime
    stopped_at: datetime | None

    @classmethod
    def from_row(cls, row: Experiment) -> ExperimentPublic:
        stopped = row.status == "stopped"
        return cls(
            name=row.name,
            model=f"exp:{row.name}",
            status=row.status,  # type: ignore[arg-type]
            arms=[ArmSpec(**arm) for arm in row.arms],
            judge=row.judge,
            keep_text=row.keep_text,
            winner=row.winner,
            serves=(row.winner or "base") if stopped else None,
            created_at=row.created_at,
            stopped_at=row.stopped_at,
        )


class ExperimentList(BaseModel):
    data: list[ExperimentPublic]


class ExperimentStop(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    winner: str | None = Field(
        None, max_length=64, description="an arm's model to serve all traffic; default: base"
    )


class Feedback(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    response_id: str = Field(min_length=1, max_length=64, description="the response's `id`")
    score: float = Field(
        ge=-MAX_FEEDBACK, le=MAX_FEEDBACK, description="any scale (1/0, 1-5 ...); mean per arm"
    )

    @field_validator("score")
    @classmethod
    def _finite(cls, score: float) -> float:
        if not math.isfinite(score):
            raise ValueError("the score must be a finite number")
        return score


class FeedbackRecorded(BaseModel):
    response_id: str
    arm: str
    feedback: float


class Outcome(BaseModel):
    response_id: str
    arm: str
    created_at: datetime
    latency_ms: float
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None
    judged: bool
    unsafe: bool | None
    unsafe_score: float | None
    refused: bool | None
    judge_error: str | None
    feedback: float | None
    prompt: str | None = Field(description="only when the experiment keeps text")
    response: str | None = Field(description="only when the experiment keeps text")

    @classmethod
    def from_row(cls, row: ExperimentOutcome) -> Outcome:
        fields = set(cls.model_fields) - {"judged"}
        return cls(judged=row.judged_at is not None, **{f: getattr(row, f) for f in fields})


class OutcomeList(BaseModel):
    data: list[Outcome]


class Rate(BaseModel):
    count: int
    trials: int = Field(description="judged responses")
    estimate: float | None
    low: float | None
    high: float | None


class Difference(BaseModel):
    estimate: float | None
    low: float | None
    high: float | None


class Latency(BaseModel):
    p50: float | None
    p95: float | None


class FeedbackSummary(BaseModel):
    count: int
    mean: float | None


class ArmResult(BaseModel):
    model: str
    weight: float
    requests: int
    judged: int
    unjudged: int
    judge_errors: int
    unsafe_rate: Rate
    refusal_rate: Rate
    mean_output_tokens: float | None
    latency_ms: Latency
    feedback: FeedbackSummary


class ArmDifference(BaseModel):
    model: str
    versus: str = Field(description="the control: the first arm")
    unsafe_rate: Difference = Field(description="this arm's rate minus the control's")
    refusal_rate: Difference


class ExperimentResults(BaseModel):
    name: str
    status: str
    confidence: float
    method: dict[str, str]
    control: str
    arms: list[ArmResult]
    differences: list[ArmDifference]
