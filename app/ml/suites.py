"""Evaluation suites of a model as it is now: what an `eval` job runs and attaches to a version.

- `safeedit`: the SafeEdit metrics (DS, DG_*, fluency, ...) over instances; default the packaged
  cases (`app/ml/data/safeedit_cases.json`);
- `bias`: CrowS-Pairs-style scores per bias type (`app.ml.bias`); default the packaged pairs;
- `perplexity`: on reference text (`app.ml.perplexity`); default the packaged reference text.

`limit` caps the SafeEdit instances, the pairs per bias type and the reference texts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any

from app.ml.bias import bias_scores, filter_pairs, load_pairs
from app.ml.errors import InputError
from app.ml.evaluation import evaluate
from app.ml.judges import Judge
from app.ml.models import LoadedModel
from app.ml.perplexity import perplexity, reference_texts
from app.ml.safeedit import SafeEditInstance, load_instances

SUITES = ("safeedit", "bias", "perplexity")
Progress = Callable[[str, float], None]


def packaged_instances() -> list[SafeEditInstance]:
    with resources.as_file(resources.files("app.ml").joinpath("data/safeedit_cases.json")) as p:
        return load_instances(p)


def run_suites(
    lm: LoadedModel,
    suites: Sequence[str],
    *,
    judge: Judge,
    instances: Sequence[SafeEditInstance] | None = None,
    texts: Sequence[str] | None = None,
    bias_types: Sequence[str] | None = None,
    limit: int | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """{suite: its metrics} for each suite asked for, in order."""
    unknown = [s for s in suites if s not in SUITES]
    if unknown:
        raise InputError(f"suites: unknown suite {unknown[0]!r} (known: {', '.join(SUITES)})")
    report = progress or (lambda _stage, _fraction: None)
    results: dict[str, Any] = {}
    for suite in dict.fromkeys(suites):

        def step(fraction: float, suite: str = suite) -> None:
            report(f"eval-{suite}", fraction)

        step(0.0)
        if suite == "safeedit":
            chosen = list(instances) if instances else packaged_instances()
            evaluation = evaluate(
                lm, chosen[:limit], judge=judge, max_new_tokens=max_new_tokens,
                batch_size=batch_size, progress=step,
            )  # fmt: skip
            results[suite] = {**evaluation.metrics, "judge": evaluation.judge}
        elif suite == "bias":
            pairs = filter_pairs(load_pairs(None), types=bias_types, limit=limit)
            results[suite] = bias_scores(lm, pairs, batch_size=batch_size, progress=step)
        else:
            chosen_texts = list(texts) if texts else reference_texts()
            results[suite] = perplexity(
                lm, chosen_texts[:limit], batch_size=batch_size, progress=step
            )
            step(1.0)
    return results
