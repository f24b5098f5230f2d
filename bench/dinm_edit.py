"""Benchmark: DINM edit time (locate + tune) and peak memory, fast path vs plain loop.

Model load and evaluation are excluded. Each configuration runs in its own child process so its
peak memory is its own; the edit is repeated and the median time reported.

    .venv/bin/python bench/dinm_edit.py                      # demo model, CPU
    .venv/bin/python bench/dinm_edit.py --shapes mistral-7b  # random Mistral-7B shapes, bf16
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CASES = ROOT / "app" / "ml" / "data" / "safeedit_cases.json"


def _load(shapes: str | None):
    import torch
    import transformers

    from app.ml.models import LoadedModel, load_model

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if shapes is None:
        return load_model("demo")
    if shapes != "mistral-7b":
        raise SystemExit(f"unknown shapes {shapes!r}")
    demo = load_model("demo", device="cpu")  # only its tokenizer is used
    config = transformers.MistralConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=len(demo.tokenizer),  # the demo tokenizer's ids must fit the embedding
        max_position_embeddings=4096,
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval().requires_grad_(False)
    return LoadedModel(model=model, tokenizer=demo.tokenizer, name="random-mistral-7b-shapes")


def child(args: argparse.Namespace) -> None:
    """Runs in a child process: print one JSON line with this configuration's figures."""
    import torch

    from app.ml.dinm import DinmParams, dinm_edit
    from app.ml.memory import peak_mb, reset_peak
    from app.ml.safeedit import find_case, load_instances

    lm = _load(args.shapes)
    instance = find_case(load_instances(CASES), args.case)
    params = DinmParams(preset=args.preset, fast_path=args.path == "fast")
    dinm_edit(lm, instance, params.model_copy(update={"steps": 1}))  # warm-up
    reset_peak(lm.device)
    seconds, layers = [], set()
    for _ in range(args.runs):
        if lm.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = dinm_edit(lm, instance, params)
        if lm.device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
        layers.add(result.layer)
    print(
        json.dumps(
            {
                "path": args.path,
                "model": lm.name,
                "device": str(lm.device),
                "dtype": str(lm.dtype).removeprefix("torch."),
                "layer": sorted(layers),
                "steps": len(result.losses),
                "seconds": seconds,
                "median_s": statistics.median(seconds),
                "peak_mb": peak_mb(lm.device),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", choices=["mistral-7b"], default=None)
    parser.add_argument("--case", default="c01", help="case id in app/ml/data/safeedit_cases.json")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--preset", default="paper", help="DINM preset (default: paper)")
    parser.add_argument("--path", choices=["fast", "plain"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.path:
        child(args)
        return
    rows = []
    for path in ("fast", "plain"):
        cmd = [
            sys.executable,
            __file__,
            "--path",
            path,
            "--case",
            args.case,
            "--runs",
            str(args.runs),
            "--preset",
            args.preset,
        ]
        if args.shapes:
            cmd += ["--shapes", args.shapes]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    fast, plain = rows
    print(
        f"DINM edit (locate + tune), {fast['model']} on {fast['device']} ({fast['dtype']}), "
        f"case {args.case}, layer {fast['layer']}, {fast['steps']} steps, median of {args.runs}"
    )
    print(f"{'path':<8}{'median s':>10}{'runs (s)':>28}{'peak MB':>10}")
    for row in rows:
        runs = " ".join(f"{s:.2f}" for s in row["seconds"])
        print(f"{row['path']:<8}{row['median_s']:>10.2f}{runs:>28}{row['peak_mb']:>10.0f}")
    print(f"fast / plain time ratio: {fast['median_s'] / plain['median_s']:.2f} (target <= 0.50)")


if __name__ == "__main__":
    main()
