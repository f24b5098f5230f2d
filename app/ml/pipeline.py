"""One DINM edit with its evaluation before and after: what the CLI and the workers both run."""

from __future__ import annotations

from collections.abc import Callable

from app.ml.deltas import applied
from app.ml.dinm import CancelCheck, DinmParams, DinmResult, Progress, dinm_edit
from app.ml.evaluation import compare, evaluate, knowledge_logprobs, locality
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

    def stage(name: str) -> Callable[[float], None]:
        return lambda fraction: report_stage(name, fraction)

    reset_peak(lm.device)
    before = evaluate(
        lm,
        [instance],
        judge=judge,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        progress=stage("eval-before"),
    )
    pre = knowledge_logprobs(lm, [instance])
    result = dinm_edit(lm, instance, params, progress=progress, should_cancel=should_cancel)
    with applied(lm.model, [result.delta]):
        after = evaluate(
            lm,
            [instance],
            judge=judge,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            progress=stage("eval-after"),
        )
        post = knowledge_logprobs(lm, [instance])
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
