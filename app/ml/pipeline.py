"""An edit (DINM, or corpus unlearning) with its evaluation before and after: what the CLI and
the workers both run."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from app.ml.bias import BiasPair, bias_scores
from app.ml.corpus import Document
from app.ml.deltas import applied
from app.ml.dinm import DinmParams, dinm_edit_many
from app.ml.dinm_locate import CancelCheck, DinmResult, Progress
from app.ml.dinm_objective import benign_retain_set
from app.ml.evaluation import Evaluation, compare, evaluate, knowledge_logprobs, locality
from app.ml.judges import Judge
from app.ml.memory import peak_mb, reset_peak
from app.ml.models import LoadedModel
from app.ml.perplexity import perplexity, reference_texts
from app.ml.safeedit import SafeEditInstance
from app.ml.unlearn import UnlearnResult, unlearn
from app.ml.unlearn_params import UnlearnParams
from app.ml.unlearn_scope import module_names


def dinm_with_report(
    lm: LoadedModel,
    instances: list[SafeEditInstance],
    params: DinmParams,
    *,
    judge: Judge,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    progress: Progress | None = None,
    should_cancel: CancelCheck | None = None,
) -> tuple[DinmResult, dict]:
    """Evaluate, edit (one delta from every instance), evaluate with the delta applied; the model
    is left as it was. The report's `case` is the first instance's, `cases` lists them all."""
    report_stage = progress or (lambda _stage, _fraction: None)

    def measure(stage: str) -> tuple[Evaluation, list[torch.Tensor]]:
        """SafeEdit answers and knowledge-constraint log-probs of the model as it is now."""
        report_stage(stage, 0.0)  # the stage shows from its start, not after its first batch
        evaluation = evaluate(
            lm,
            instances,
            judge=judge,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            progress=lambda fraction: report_stage(stage, fraction),
        )
        return evaluation, knowledge_logprobs(lm, instances)

    if params.layer is not None:  # a layer it does not have: fail before the evaluation
        lm.adapter.check_layer(params.layer)
    reset_peak(lm.device)
    before, pre = measure("eval-before")
    result = dinm_edit_many(lm, instances, params, progress=progress, should_cancel=should_cancel)
    with applied(lm.model, [result.delta]):
        after, post = measure("eval-after")
    comparison = compare(before, after)
    comparison["metrics"]["after"].update(locality(pre, post))
    report = {
        "case": instances[0].id,
        "category": instances[0].category,
        **({"cases": [i.id for i in instances]} if len(instances) > 1 else {}),
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


def default_retain() -> list[Document]:
    """The retain text when a job gives none: the packaged benign retain set, question and
    answer as one text (everyday language the edit must keep)."""
    return [Document(f"{prompt}\n{answer}") for prompt, answer in benign_retain_set()]


_PERPLEXITY_SHARE = 0.2  # of an unlearning job's evaluation stage, before the bias scores


def unlearn_with_report(
    lm: LoadedModel,
    forget: Sequence[Document],
    retain: Sequence[Document] | None,
    method: str,
    params: UnlearnParams,
    *,
    bias_pairs: Sequence[BiasPair] = (),
    reference: Sequence[str] | None = None,
    batch_size: int = 8,
    progress: Progress | None = None,
    should_cancel: CancelCheck | None = None,
) -> tuple[UnlearnResult, dict]:
    """Measure (reference perplexity, bias scores), unlearn, measure with the delta applied."""
    report_stage = progress or (lambda _stage, _fraction: None)
    texts = list(reference) if reference is not None else reference_texts()

    def measure(stage: str) -> dict[str, Any]:
        report_stage(stage, 0.0)
        split = _PERPLEXITY_SHARE if bias_pairs else 1.0  # of the stage, the rest: bias scores
        measured: dict[str, Any] = {
            "perplexity": perplexity(
                lm, texts, batch_size=batch_size,
                progress=lambda fraction: report_stage(stage, split * fraction),
            )
        }  # fmt: skip
        if bias_pairs:
            measured["bias"] = bias_scores(
                lm, list(bias_pairs), batch_size=batch_size,
                progress=lambda fraction: report_stage(stage, split + (1 - split) * fraction),
            )  # fmt: skip
        report_stage(stage, 1.0)
        return measured

    module_names(lm, params)  # layers or modules it does not have: fail before the evaluation
    reset_peak(lm.device)
    before = measure("eval-before")
    retain = list(retain) if retain else default_retain()
    result = unlearn(lm, forget, retain, method, params, progress=progress,
                     should_cancel=should_cancel)  # fmt: skip
    with applied(lm.model, [result.delta]):
        after = measure("eval-after")
    report = {
        "kind": "unlearn",
        "method": method,
        "model": lm.name,
        "scope": params.scope,
        "delta_params": result.delta.params,
        "steps": result.steps,
        "stopped": result.stopped,
        "edit_seconds": round(result.edit_seconds, 3),
        "forget_documents": len(forget),
        "forget_tokens": result.forget_tokens,
        "retain_documents": len(retain),
        "forget_nll": {"before": result.forget_nll_before, "after": result.forget_nll_after},
        "retain_perplexity": {  # "after": of the kept state (a guard stop rolls back)
            "before": result.retain_ppl_before,
            "after": next(c["retain_ppl"] for c in result.checks if c["step"] == result.steps),
        },
        "history": result.history,
        "checks": result.checks,
        "params": params.model_dump(),
        "peak_memory_mb": round(peak_mb(lm.device), 1),
        "device": str(lm.device),
        "dtype": str(lm.dtype).removeprefix("torch."),
        "warnings": result.warnings,
        "metrics": {"before": before, "after": after},
    }
    return result, report
