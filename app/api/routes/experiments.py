"""/v1/experiments: A/B experiments on live traffic. Create one over live models, send requests
with `model: "exp:<name>"` (and the OpenAI `user` field for sticky arms), read its results with
confidence intervals, send feedback on responses, stop it (all traffic to a winner, or base)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Path, Query, Request, Response
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.api.auth import Editor, EditorDep, Reader
from app.api.deps import SessionDep
from app.api.errors import ApiError
from app.api.schemas import (
    ExperimentCreate,
    ExperimentList,
    ExperimentPublic,
    ExperimentResults,
    ExperimentStop,
    Feedback,
    FeedbackRecorded,
    Outcome,
    OutcomeList,
)
from app.experiments.assign import Arm
from app.experiments.results import summarize
from app.ml.judge_names import versioned
from app.store import crud
from app.store.errors import DuplicateExperimentName, NotFound

router = APIRouter(prefix="/v1/experiments", tags=["experiments"])

Name = Annotated[str, Path(max_length=64, description="the experiment's name")]
FEEDBACK_WAIT_S = 5.0  # a response is recorded moments after it is served

CREATE_EXAMPLES = {
    "ab": {
        "value": {
            "name": "v3-vs-base",
            "arms": [{"model": "base", "weight": 50}, {"model": "v3", "weight": 50}],
            "judge": "offline",
        }
    }
}

STOP_EXAMPLES = {"winner": {"value": {"winner": "v3"}}, "to base": {"value": {}}}
FEEDBACK_EXAMPLES = {"score": {"value": {"response_id": "chatcmpl-8f3a...", "score": 1}}}


def _pinned_arms(session: Session, body: ExperimentCreate) -> list[dict[str, Any]]:
    """The arms with each model checked live; "latest" is pinned to today's latest version."""
    arms = []
    for index, arm in enumerate(body.arms):
        model = arm.model
        if model != "base":
            try:
                model = crud.get_version(session=session, name=model).name
            except NotFound:
                raise ApiError(
                    422, f"arm {index}: no live version named {model!r}",
                    param=f"arms[{index}].model", code="model_not_found",
                ) from None  # fmt: skip
        arms.append({"model": model, "weight": arm.weight})
    if len({arm["model"] for arm in arms}) != len(arms):
        raise ApiError(422, '"latest" names the same version as another arm', param="arms")
    return arms


@router.post(
    "",
    status_code=201,
    response_model=ExperimentPublic,
    responses={409: {"description": "an experiment of that name exists"}},
)
def create_experiment(
    body: Annotated[ExperimentCreate, Body(openapi_examples=CREATE_EXAMPLES)],
    request: Request,
    response: Response,
    session: SessionDep,
    caller: EditorDep,
) -> ExperimentPublic:
    """Start an experiment: from now on `model: "exp:<name>"` picks an arm per request."""
    if crud.experiment_name_exists(session=session, name=body.name):
        raise DuplicateExperimentName(body.name)
    row = crud.create_experiment(
        session=session,
        name=body.name,
        arms=_pinned_arms(session, body),
        judge=versioned(body.judge),  # "offline" is stored as the version it means today
        keep_text=body.keep_text,
        api_key_id=caller.key_id,
    )
    request.app.state.experiments.forget(row.name)
    response.headers["Location"] = f"/v1/experiments/{row.name}"
    return ExperimentPublic.from_row(row)


@router.get("", response_model=ExperimentList, dependencies=[Reader])
def list_experiments(
    session: SessionDep,
    status: Annotated[str | None, Query(pattern="^(running|stopped)$")] = None,
    limit: Annotated[int, Query(ge=1, le=crud.MAX_PAGE)] = 100,
) -> ExperimentList:
    """Newest first."""
    rows = crud.list_experiments(session=session, status=status, limit=limit)
    return ExperimentList(data=[ExperimentPublic.from_row(row) for row in rows])


@router.get("/{name}", response_model=ExperimentPublic, dependencies=[Reader])
def get_experiment(name: Name, session: SessionDep) -> ExperimentPublic:
    return ExperimentPublic.from_row(crud.get_experiment(session=session, name=name))


@router.post(
    "/{name}/stop",
    response_model=ExperimentPublic,
    dependencies=[Editor],
    responses={409: {"description": "stopped already"}},
)
def stop_experiment(
    name: Name,
    request: Request,
    session: SessionDep,
    body: Annotated[ExperimentStop | None, Body(openapi_examples=STOP_EXAMPLES)] = None,
) -> ExperimentPublic:
    """Stop counting; from now on every request goes to `winner` (an arm), or to base."""
    winner = body.winner if body is not None else None
    experiment = crud.get_experiment(session=session, name=name)
    if winner is not None and winner not in {arm["model"] for arm in experiment.arms}:
        arms = ", ".join(arm["model"] for arm in experiment.arms)
        raise ApiError(422, f"the winner must be one of the arms ({arms})", param="winner")
    row = crud.stop_experiment(session=session, name=name, winner=winner)
    request.app.state.experiments.forget(name)
    return ExperimentPublic.from_row(row)


@router.get("/{name}/results", response_model=ExperimentResults, dependencies=[Reader])
def experiment_results(name: Name, session: SessionDep) -> ExperimentResults:
    """Per arm: requests, unsafe and refusal rates (95% Wilson intervals), mean output tokens,
    latency p50/p95, feedback; and each arm minus the first (Newcombe's interval)."""
    experiment = crud.get_experiment(session=session, name=name)
    counts = crud.arm_counts(session=session, experiment_id=experiment.id)
    arms = [Arm(arm["model"], float(arm["weight"])) for arm in experiment.arms]
    return ExperimentResults(
        name=experiment.name, status=experiment.status, **summarize(arms, counts)
    )


@router.get("/{name}/outcomes", response_model=OutcomeList, dependencies=[Reader])
def list_outcomes(
    name: Name, session: SessionDep, limit: Annotated[int, Query(ge=1, le=crud.MAX_PAGE)] = 100
) -> OutcomeList:
    """The latest recorded responses, newest first (text only when the experiment keeps it)."""
    experiment = crud.get_experiment(session=session, name=name)
    rows = crud.list_outcomes(session=session, experiment_id=experiment.id, limit=limit)
    return OutcomeList(data=[Outcome.from_row(row) for row in rows])


@router.post(
    "/{name}/feedback",
    response_model=FeedbackRecorded,
    dependencies=[Reader],
    responses={404: {"description": "no such experiment, or no such response in it"}},
)
async def feedback(
    name: Name,
    body: Annotated[Feedback, Body(openapi_examples=FEEDBACK_EXAMPLES)],
    request: Request,
    session: SessionDep,
) -> FeedbackRecorded:
    """A client's score of one response (by its `id`); a later score replaces an earlier one."""
    experiment = await run_in_threadpool(crud.get_experiment, session=session, name=name)
    # The response may have been served a moment ago and still be on its way to the store.
    await run_in_threadpool(request.app.state.outcomes.wait, body.response_id, FEEDBACK_WAIT_S)
    row = await run_in_threadpool(
        crud.set_feedback,
        session=session,
        experiment_id=experiment.id,
        response_id=body.response_id,
        score=body.score,
    )
    return FeedbackRecorded(response_id=row.response_id, arm=row.arm, feedback=body.score)
