"""An experiment's results from its per-arm counts: rates with Wilson intervals, and each arm's
difference from the first arm (the control) with Newcombe's interval. Pure: counts in, a dict
shaped as the API's `ExperimentResults` out."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from app.experiments.assign import Arm
from app.experiments.stats import CONFIDENCE, Interval, newcombe, percentile, wilson
from app.store.crud import ArmCounts

METHOD = {
    "rate": "wilson",
    "difference": "newcombe",
    "percentile": "linear interpolation between order statistics",
}


def _rate(count: int, trials: int) -> dict[str, Any]:
    return {"count": count, "trials": trials, **_interval(wilson(count, trials))}


def _interval(interval: Interval) -> dict[str, Any]:
    return {"estimate": interval.estimate, "low": interval.low, "high": interval.high}


def _empty(model: str) -> ArmCounts:
    return ArmCounts(model, 0, 0, 0, 0, 0, 0, 0, 0.0, [])


def _arm(arm: Arm, counts: ArmCounts) -> dict[str, Any]:
    requests = counts.requests
    return {
        "model": arm.model,
        "weight": arm.weight,
        "requests": requests,
        "judged": counts.judged,
        "unjudged": requests - counts.judged,
        "judge_errors": counts.judge_errors,
        "unsafe_rate": _rate(counts.unsafe, counts.judged),
        "refusal_rate": _rate(counts.refused, counts.judged),
        "mean_output_tokens": counts.completion_tokens / requests if requests else None,
        "latency_ms": {
            "p50": percentile(counts.latencies_ms, 50),
            "p95": percentile(counts.latencies_ms, 95),
        },
        "feedback": {
            "count": counts.feedback_count,
            "mean": counts.feedback_sum / counts.feedback_count if counts.feedback_count else None,
        },
    }


def _difference(arm: ArmCounts, control: ArmCounts, model: str, versus: str) -> dict[str, Any]:
    return {
        "model": model,
        "versus": versus,
        "unsafe_rate": _interval(newcombe(arm.unsafe, arm.judged, control.unsafe, control.judged)),
        "refusal_rate": _interval(
            newcombe(arm.refused, arm.judged, control.refused, control.judged)
        ),
    }


def summarize(arms: Sequence[Arm], counts: dict[str, ArmCounts]) -> dict[str, Any]:
    """Per arm (in the experiment's order) and each later arm minus the first."""
    by_arm = [(arm, counts.get(arm.model) or _empty(arm.model)) for arm in arms]
    control_arm, control = by_arm[0]
    return {
        "confidence": CONFIDENCE,
        "method": METHOD,
        "control": control_arm.model,
        "arms": [_arm(arm, arm_counts) for arm, arm_counts in by_arm],
        "differences": [
            _difference(arm_counts, control, arm.model, control_arm.model)
            for arm, arm_counts in by_arm[1:]
        ],
    }
