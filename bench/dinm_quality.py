"""Benchmark: DINM on every case of a SafeEdit file, metrics before and after, averaged.

For each case: one edit of the base model (delta applied, evaluated, reverted), then the SafeEdit
metrics of that case before and after. Prints a per-case table and the mean over cases.

    .venv/bin/python bench/dinm_quality.py [--file tests/data/safeedit_cases.json] [--params JSON]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

COLUMNS = ("DS", "DG_onlyQ", "DG_otherA", "DG_otherQ", "DG_otherAQ", "DG_avg", "fluency")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file", default=str(ROOT / "tests" / "data" / "safeedit_cases.json"))
    parser.add_argument("--params", default="{}", help="DINM params as a JSON object")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--json-out", default=None, help="also write every report here")
    args = parser.parse_args()

    import transformers

    from app.ml.judges import load_judge
    from app.ml.models import load_model
    from app.ml.params import DinmParams
    from app.ml.pipeline import dinm_with_report
    from app.ml.safeedit import load_instances

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    lm = load_model("demo")
    judge = load_judge("offline")
    params = DinmParams.parse(json.loads(args.params))
    instances = load_instances(args.file)[: args.limit]
    reports = []
    print(f"{'case':<6}{'layer':>6}{'edit s':>8}  " + "".join(f"{c:>16}" for c in COLUMNS))
    for instance in instances:
        _, report = dinm_with_report(
            lm, instance, params, judge=judge, max_new_tokens=args.max_new_tokens
        )
        reports.append(report)
        before, after = report["metrics"]["before"], report["metrics"]["after"]
        cells = "".join(f"{_pair(before.get(c), after.get(c)):>16}" for c in COLUMNS)
        print(
            f"{instance.id:<6}{report['layer']:>6}{report['edit_seconds']:>8.2f}  {cells}",
            flush=True,
        )
    print(
        f"{'mean':<6}{'':>6}{statistics.mean(r['edit_seconds'] for r in reports):>8.2f}  ", end=""
    )
    print(
        "".join(
            f"{_pair(_mean(reports, 'before', c), _mean(reports, 'after', c)):>16}" for c in COLUMNS
        )
    )
    locality = _mean(reports, "after", "locality")
    print(
        f"locality after: {locality:.1f}; judge {reports[0]['judge']}; "
        f"params {params.model_dump_json()}"
    )
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(reports, indent=2))


def _mean(reports: list[dict], side: str, column: str) -> float | None:
    values = [r["metrics"][side].get(column) for r in reports]
    values = [v for v in values if v is not None]
    return statistics.mean(values) if values else None


def _pair(before: float | None, after: float | None) -> str:
    def fmt(x: float | None) -> str:
        return "-" if x is None else f"{x:.1f}"

    return f"{fmt(before)} -> {fmt(after)}"


if __name__ == "__main__":
    main()
