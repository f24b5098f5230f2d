"""The transfer experiment of "Towards Transfer Unlearning" (Lu et al. 2024), on the demo model.

Forget set: the stereotyping sentences (`sent_more`) of the CrowS-Pairs gender pairs, with the
words that differ from the partner sentence as harmful spans (a natural span annotation). A seeded
share of the gender pairs is held out. Each method unlearns from the base model; bias scores
(`app.ml.bias`, the `shared` formula, 50 = no preference) are measured on the held-out gender
pairs and on the race-color and religion pairs (never trained on), with the reference perplexity,
before and after. The table is printed whatever the outcome: the point is to measure transfer.

    .venv/bin/python bench/transfer.py [--methods masked_ga,ga,graddiff,npo] [--steps 30]
"""

from __future__ import annotations

import argparse
import random
import sys
import time

from harness import stereotype_documents

from app.ml.bias import BiasPair, bias_scores, filter_pairs, load_pairs
from app.ml.deltas import applied
from app.ml.perplexity import perplexity, reference_texts

TRANSFER_TYPES = ("race-color", "religion")


def split(pairs: list[BiasPair], held_out: float, seed: int) -> tuple[list, list]:
    order = list(pairs)
    random.Random(seed).shuffle(order)
    cut = int(len(order) * held_out)
    return order[cut:], order[:cut]


def measure(lm, groups: dict[str, list[BiasPair]], texts: list[str]) -> dict[str, float]:
    row = {name: bias_scores(lm, pairs)["overall"] for name, pairs in groups.items()}
    row["perplexity"] = perplexity(lm, texts)["perplexity"]
    return row


def main() -> None:
    from app.ml.models import load_model
    from app.ml.pipeline import default_retain
    from app.ml.unlearn import unlearn
    from app.ml.unlearn_params import UnlearnParams

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--methods", default="masked_ga,ga,graddiff,npo")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--scope", default="lora")
    parser.add_argument("--held-out", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-ppl-increase", type=float, default=0.10)
    args = parser.parse_args()

    lm = load_model(args.model, device=args.device)
    pairs = load_pairs(None)
    train, held = split(filter_pairs(pairs, types=["gender"]), args.held_out, args.seed)
    groups = {"gender (held out)": held}
    groups |= {t: filter_pairs(pairs, types=[t]) for t in TRANSFER_TYPES}
    forget = stereotype_documents(train)
    texts = reference_texts()
    transfer = ", ".join(f"{t} {len(groups[t])}" for t in TRANSFER_TYPES)
    print(f"{len(forget)} forget documents from {len(train)} gender pairs; held out: "
          f"{len(held)} gender pairs; transfer: {transfer}", file=sys.stderr)  # fmt: skip
    rows = [("base", measure(lm, groups, texts), "", "")]
    for method in args.methods.split(","):
        params = UnlearnParams(
            steps=args.steps, lr=args.lr, scope=args.scope, seed=args.seed, batch_size=8,
            max_ppl_increase=args.max_ppl_increase,
        )  # fmt: skip
        start = time.perf_counter()
        result = unlearn(lm, forget, default_retain(), method, params)
        with applied(lm.model, [result.delta]):
            row = measure(lm, groups, texts)
        note = f"{result.steps} steps ({result.stopped}), {time.perf_counter() - start:.0f} s"
        nll = f"{result.forget_nll_before:.2f} -> {result.forget_nll_after:.2f}"
        rows.append((method, row, note, nll))
        print(f"{method}: {note}", file=sys.stderr)

    columns = [*groups, "perplexity"]
    print(f"\ntransfer unlearning: {args.model}, {args.scope}, lr {args.lr}, <= {args.steps} "
          f"steps, retain-perplexity guard +{args.max_ppl_increase:.0%}; bias score "
          "(shared tokens, 50 = no preference)")  # fmt: skip
    header = f"| method | {' | '.join(columns)} | forget NLL | run |"
    print(header)
    print("|" + "---|" * (len(columns) + 3))
    for name, row, note, nll in rows:
        cells = " | ".join(f"{row[c]:.1f}" if c != "perplexity" else f"{row[c]:.2f}"
                           for c in columns)  # fmt: skip
        print(f"| {name} | {cells} | {nll} | {note} |")


if __name__ == "__main__":
    main()
