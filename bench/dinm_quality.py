"""Benchmark: DINM quality per configuration, averaged over the cases of a SafeEdit file.

For each configuration (a preset, with `--params` applied on top) and each case: one edit of the
base model, then, with the delta applied (and removed again afterwards), the metrics AFTER the edit
(the base model's SafeEdit scores are not re-measured per configuration):
- the SafeEdit metrics of the case: DS, DG_onlyQ, DG_otherA, DG_otherQ, DG_otherAQ (their mean
  is DG_avg) and fluency, answered greedily with `--max-new-tokens` new tokens;
- over-refusal: share of `tests/data/benign_prompts.json` the edited model refuses minus the share
  the base model refuses (offline judge, harmful=False), in points, `--short-tokens` new tokens;
  `heldout_or` is the same on `tests/data/benign_heldout.json`, a second benign set written after
  the presets were tuned (only `contrastive`'s last change was picked with it in view);
- facts kept: share of `tests/data/general_questions.json` answers that still contain their fact
  keyword (case-insensitive), `--short-tokens` new tokens; the base's share is printed too;
- edit seconds (locate + tune, evaluation excluded).
The token budgets are the same for every configuration. Prints a per-case table, then one
summary row per configuration. `--edit-only` skips every evaluation and times the edits after
one untimed warm-up edit, for edit times measured alone (the evaluation of one process slows the
edits of another sharing the CPU).

    .venv/bin/python bench/dinm_quality.py --preset paper --preset selective [--params JSON]
        [--limit N] [--cases ID,ID] [--file FILE] [--json-out PATH] [--edit-only]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"

SAFEEDIT = ("DS", "DG_onlyQ", "DG_otherA", "DG_otherQ", "DG_otherAQ", "DG_avg", "fluency")
COLUMNS = (*SAFEEDIT, "over_refusal", "heldout_or", "facts_kept", "edit_s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file", default=str(ROOT / "app" / "ml" / "data" / "safeedit_cases.json"))
    parser.add_argument("--preset", action="append", help="a preset to measure; repeatable")
    parser.add_argument("--params", default="{}", help="DINM params (JSON) over every preset")
    parser.add_argument("--limit", type=int, default=None, help="the first N cases only")
    parser.add_argument("--cases", default=None, help="comma-separated case ids")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="SafeEdit answers")
    parser.add_argument("--short-tokens", type=int, default=20, help="benign and fact answers")
    parser.add_argument("--json-out", default=None, help="also write every report here")
    parser.add_argument("--edit-only", action="store_true", help="time the edits, no metrics")
    args = parser.parse_args()

    import torch
    import transformers

    from app.ml.deltas import applied
    from app.ml.dinm import dinm_edit
    from app.ml.dinm_params import DEFAULT_PRESET, DinmParams
    from app.ml.evaluation import evaluate
    from app.ml.judges import load_judge
    from app.ml.models import load_model
    from app.ml.safeedit import load_instances

    if threads := os.environ.get("DETOX_TORCH_THREADS"):
        torch.set_num_threads(int(threads))
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    lm = load_model("demo")
    judge = load_judge("offline")
    instances = load_instances(args.file)
    if args.cases:
        wanted = args.cases.split(",")
        instances = [i for i in instances if i.id in wanted]
    instances = instances[: args.limit]
    benign = json.loads((DATA / "benign_prompts.json").read_text())
    heldout = json.loads((DATA / "benign_heldout.json").read_text())
    general = json.loads((DATA / "general_questions.json").read_text())

    side: dict[str, list[str]] = {}  # the last side_metrics call's refused prompts, lost facts

    def side_metrics() -> tuple[float, float, float]:
        from app.ml.generation import generate

        short = {"max_new_tokens": args.short_tokens, "batch_size": 16}
        prompts = benign + heldout
        texts = [g.text for g in generate(lm, prompts, **short)]
        refused = [v.refused for v in judge.judge(prompts, texts, harmful=False)]
        answers = generate(lm, [g["question"] for g in general], **short)
        kept = [g["fact"].lower() in a.text.lower() for g, a in zip(general, answers, strict=True)]
        side["refused"] = [
            f"{p} -> {t}" for p, t, r in zip(prompts, texts, refused, strict=True) if r
        ]
        side["facts_lost"] = [g["question"] for g, k in zip(general, kept, strict=True) if not k]
        share = [
            100.0 * statistics.mean(part)
            for part in (refused[: len(benign)], refused[len(benign) :])
        ]
        return share[0], share[1], 100.0 * statistics.mean(kept)

    base_refusal = base_heldout = 0.0
    if not args.edit_only:
        base_refusal, base_heldout, base_facts = side_metrics()
        print(
            f"base: refuses {base_refusal:.1f}% of benign prompts ({base_heldout:.1f}% held "
            f"out), keeps {base_facts:.1f}% of facts"
        )
    extra = json.loads(args.params)
    summaries, reports = [], []
    for preset in args.preset or [DEFAULT_PRESET]:
        params = DinmParams.parse({"preset": preset, **extra})
        print(f"\n== {preset}: {params.model_dump_json()}")
        print(f"{'case':<6}{'layer':>6}" + "".join(f"{c:>13}" for c in COLUMNS), flush=True)
        rows = []
        if args.edit_only:  # what later edits reuse (app/ml/weights_cache.py), made untimed
            dinm_edit(lm, instances[0], params)
        for instance in instances:
            result = dinm_edit(lm, instance, params)
            if args.edit_only:
                rows.append({c: None for c in COLUMNS} | {"edit_s": result.edit_seconds})
                reports.append(
                    {"preset": preset, "case": instance.id, "bench": rows[-1],
                     "losses": result.losses}
                )  # fmt: skip
                print(f"{instance.id:<6}{result.layer:>6}" + _cells(rows[-1]), flush=True)
                continue
            with applied(lm.model, [result.delta]):
                evaluation = evaluate(
                    lm, [instance], judge=judge, max_new_tokens=args.max_new_tokens
                )
                refusal, heldout_refusal, facts = side_metrics()
            after = evaluation.metrics
            row = {c: after.get(c) for c in SAFEEDIT}
            row |= {
                "over_refusal": refusal - base_refusal,
                "heldout_or": heldout_refusal - base_heldout,
                "facts_kept": facts,
                "edit_s": result.edit_seconds,
            }
            rows.append(row)
            answers = {item.kind: (item.text, item.unsafe) for item in evaluation.items}
            reports.append(
                {
                    "preset": preset,
                    "case": instance.id,
                    "layers": result.layers,
                    "bench": row,
                    "losses": result.losses,
                    "answers": answers,
                    **side,
                }
            )
            print(f"{instance.id:<6}{result.layer:>6}" + _cells(row), flush=True)
        mean = {c: _mean([r[c] for r in rows]) for c in COLUMNS}
        summaries.append((preset, mean))
        print(f"{'mean':<6}{'':>6}" + _cells(mean), flush=True)
    print(
        f"\nsummary over {len(instances)} cases; judge {judge.name}; params {extra}; "
        f"tokens {args.max_new_tokens}/{args.short_tokens}; {time.strftime('%H:%M:%S')}"
    )
    print(f"{'preset':<10}" + "".join(f"{c:>13}" for c in COLUMNS))
    for preset, mean in summaries:
        print(f"{preset:<10}" + _cells(mean))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(reports, indent=2))


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.mean(present) if present else None


def _cells(row: dict) -> str:
    return "".join(
        f"{'-' if row[c] is None else f'{row[c]:.{_DIGITS.get(c, 1)}f}':>13}" for c in COLUMNS
    )


_DIGITS = {"edit_s": 2}  # edits of under a second are compared with one another


if __name__ == "__main__":
    main()
