"""One DINM edit with its evaluation before and after: what the CLI and the workers both run."""

from __future__ import annotations

import torch

from app.ml.deltas import applied
from app.ml.dinm import CancelCheck, DinmParams, DinmResult, Progress, dinm_edit
from app.ml.evaluation import Evaluation, compare, evaluate, knowledge_logprobs, locality
from app.ml.judges import Judge
from app.ml.memory import peak_mb, reset_peak
from app.ml.models import LoadedModel
from app.ml.safeedit import SafeEditInstance


def dinm_with_report(
    lm: LoadedModel,
    instance: SafeEditInstance,
    params: DinmParams,
    *,
    judge: Judge,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    progress: Progress | None = None,
    should_cancel: CancelCheck | None = None,
) -> tuple[DinmResult, dict]:
    """Evaluate, edit, evaluate with the delta applied; the model is left as it was."""
    report_stage = progress or (lambda _stage, _fraction: None)

    def measure(stage: str) -> tuple[Evaluation, list[torch.Tensor]]:
        """SafeEdit answers and knowledge-constraint log-probs of the model as it is now."""
        evaluation = evaluate(
            lm,
            [instance],
            judge=judge,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            progress=lambda fraction: report_stage(stage, fraction),
        )
        return evaluation, knowledge_logprobs(lm, [instance])

    reset_peak(lm.device)
    before, pre = measure("eval-before")
    result = dinm_edit(lm, instance, params, progress=progress, should_cancel=should_cancel)
    with applied(lm.model, [result.delta]):
        after, post = measure("eval-after")
    comparison = compare(before, after)
    comparison["metrics"]["after"].update(locality(pre, post))
    report = {
        "case": instance.id,
        "category": instance.category,
        "model": lm.name,
        "layer": result.layer,
        "layers": result.layers,
        "param": result.delta.params[0],
        "delta_params": result.delta.params,
        "edit_seconds": round(result.edit_seconds, 3),
        "losses": [round(x, 6) for x in result.losses],
        "layer_distances": [round(x, 4) for x in result.distances],
        "params": params.model_dump(),
        "peak_memory_mb": round(peak_mb(lm.device), 1),
        "device": str(lm.device),
        "dtype": str(lm.dtype).removeprefix("torch."),
        "warnings": result.warnings,
        **comparison,
    }
    return result, report
