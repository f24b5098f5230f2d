"""Benchmark: does an edit make the model safe in general without over-refusing? XSTest's
development half, the packaged SafeEdit cases, facts, perplexity and fluency, per configuration.

For the base model and each configuration (a DINM params object, preset included, edited from
the first packaged SafeEdit case or from all of them), with the edit's delta applied:
- XSTest (Röttger et al., NAACL 2024; CC BY 4.0; tests/data/xstest/xstest_dev.csv): the share of
  its 125 unsafe prompts refused and of its 125 safe prompts refused (over-refusal), with 95%
  Wilson intervals; greedy answers of `--tokens` new tokens, refusal by the offline judge's
  detector. XSTest only measures here: no edit trains or retains on its prompts (a test checks).
- refusals that end (the model stopped before the token cap) and refusals that repeat no sentence;
- fluency: SafeEdit's n-gram entropy, the mean over the same XSTest answers;
- SafeEdit on the 19 packaged cases (app/ml/data/safeedit_cases.json): DS and the mean of the
  four DG metrics, unsafe judged by the offline judge, `--tokens` new tokens;
- facts kept (tests/data/general_questions.json: the answer holds the fact word) and perplexity
  on the packaged reference text, relative to the base;
- edit seconds: the whole edit in this process (the first edit of a process also builds what later
  ones reuse; see bench/dinm_instances.py for first and warm times apart).

    .venv/bin/python bench/xstest.py                      # base, default 1 case, default all
    .venv/bin/python bench/xstest.py --config 'contrastive/1={"preset": "contrastive"}' \\
        --config 'broad={"preset": "broad", "steps": 100}'   # LABEL[/1]=PARAMS; /1: one case

Measured in this process with the delta applied to the loaded model; the served version decodes
the same greedy tokens (tests/serving check the engine against plain generation).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from pathlib import Path

from harness import xstest_dev

ROOT = Path(__file__).resolve().parents[1]
CASES = ROOT / "app" / "ml" / "data" / "safeedit_cases.json"
GENERAL = ROOT / "tests" / "data" / "general_questions.json"
DEFAULT_CONFIGS = ("default/1={}", "default={}")
COLUMNS = (
    "unsafe refused %", "safe refused %", "ended %", "no repeat %", "fluency", "DS", "DG avg",
    "facts %", "ppl +%", "edit s",
)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config",
        action="append",
        help="LABEL=PARAMS (JSON DINM params); a LABEL whose first word ends in /1 ('broad/1', "
        "'broad/1 rank 8') edits from the first case "
        "only, else from all cases; repeatable (default: the default preset both ways)",
    )
    parser.add_argument("--tokens", type=int, default=48, help="new tokens per answer")
    parser.add_argument("--json-out", type=Path, help="also write every row and answer here")
    parser.add_argument("--no-base", action="store_true", help="skip the base model's row")
    args = parser.parse_args()

    import transformers

    from app.ml.deltas import applied
    from app.ml.dinm import dinm_edit_many
    from app.ml.dinm_params import DinmParams
    from app.ml.judges import load_judge
    from app.ml.models import load_model
    from app.ml.safeedit import load_instances

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    lm = load_model("demo")
    judge = load_judge("offline")
    cases = load_instances(CASES)
    xstest = xstest_dev()
    general = json.loads(GENERAL.read_text())
    measure = _Measure(lm, judge, cases, xstest, general, args.tokens)

    print(f"XSTest dev ({len(xstest)} prompts), judge {judge.name}, {args.tokens} tokens")
    print("| configuration | " + " | ".join(COLUMNS) + " |")
    print("|---" * (len(COLUMNS) + 1) + "|")
    rows = []
    if not args.no_base:
        rows.append(measure("base", None))
    for spec in args.config or DEFAULT_CONFIGS:
        label, _, params_json = spec.partition("=")
        params = DinmParams.parse(json.loads(params_json or "{}"))
        instances = cases[:1] if re.match(r"\S*/1(\s|$)", label) else cases  # first word
        started = time.perf_counter()
        result = dinm_edit_many(lm, instances, params)
        seconds = time.perf_counter() - started
        with applied(lm.model, [result.delta]):
            rows.append(measure(label, seconds, params=params.model_dump()))
    if args.json_out:
        args.json_out.write_text(json.dumps(rows, indent=1))


class _Measure:
    def __init__(self, lm, judge, cases, xstest, general, tokens):
        from app.ml.perplexity import perplexity

        self.lm, self.judge, self.cases, self.xstest = lm, judge, cases, xstest
        self.general, self.tokens = general, tokens
        self.base_ppl = perplexity(lm)["perplexity"]

    def __call__(self, label: str, edit_s: float | None, **extra) -> dict:
        from app.experiments.stats import wilson
        from app.ml.evaluation import evaluate, fluency
        from app.ml.generation import generate
        from app.ml.perplexity import perplexity

        prompts = [row["prompt"] for row in self.xstest]
        answers = generate(self.lm, prompts, max_new_tokens=self.tokens, batch_size=32)
        texts = [a.text for a in answers]
        refused = [v.refused for v in self.judge.judge(prompts, texts, harmful=False)]
        rates = {}
        for label_ in ("unsafe", "safe"):
            picked = [
                r for r, row in zip(refused, self.xstest, strict=True) if row["label"] == label_
            ]
            rates[label_] = wilson(sum(picked), len(picked))
        refusals = [(a, t) for a, t, r in zip(answers, texts, refused, strict=True) if r]
        evaluation = evaluate(self.lm, self.cases, judge=self.judge, max_new_tokens=self.tokens)
        dg = [evaluation.metrics[k] for k in ("DG_onlyQ", "DG_otherA", "DG_otherQ", "DG_otherAQ")]
        facts = generate(self.lm, [g["question"] for g in self.general], max_new_tokens=20)
        kept = [
            g["fact"].lower() in f.text.lower() for g, f in zip(self.general, facts, strict=True)
        ]
        ppl = perplexity(self.lm)["perplexity"]
        row = {
            "configuration": label,
            "unsafe refused %": _interval(rates["unsafe"]),
            "safe refused %": _interval(rates["safe"]),
            "ended %": _share(a.completion_tokens < self.tokens for a, _ in refusals),
            "no repeat %": _share(not _repeats(t) for _, t in refusals),
            "fluency": f"{statistics.mean(fluency(t) for t in texts):.2f}",
            "DS": f"{evaluation.metrics['DS']:.1f}",
            "DG avg": f"{statistics.mean(dg):.1f}",
            "facts %": _share(kept),
            "ppl +%": f"{100 * (ppl / self.base_ppl - 1):+.1f}",
            "edit s": "-" if edit_s is None else f"{edit_s:.0f}",
        }
        print("| " + " | ".join(row[c] for c in ("configuration", *COLUMNS)) + " |", flush=True)
        answers_out = [
            {"prompt": p, "label": x["label"], "type": x["type"], "answer": t, "refused": r}
            for p, x, t, r in zip(prompts, self.xstest, texts, refused, strict=True)
        ]
        return row | extra | {"answers": answers_out}


def _interval(interval) -> str:
    return f"{100 * interval.estimate:.1f} [{100 * interval.low:.1f}, {100 * interval.high:.1f}]"


def _share(flags) -> str:
    flags = list(flags)
    return f"{100 * sum(flags) / len(flags):.1f}" if flags else "-"


def _repeats(text: str) -> bool:
    """Whether a sentence comes twice in `text` (case and surrounding space ignored)."""
    sentences = [s.strip().lower() for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()]
    return len(sentences) != len(set(sentences))


if __name__ == "__main__":
    main()
