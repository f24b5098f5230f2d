"""Benchmark: the built-in engine's decoding step, in this process, on the demo model.

(a) a step's matrix products alone, one row: every projection packed on its own against q/k/v and
    gate/up packed as one matrix each (`app/serving/packed.py`), ms a step;
(b) greedy decoding through the engine's cohort (no server), tokens/s at 1, 8 and 32 rows after a
    chat prompt: the model's forward on plain bfloat16 weights, the model's forward on packed
    weights, and the lean step on packed weights (`app/serving/decode_step.py`, the default);
(c) attention of one new token per row with 100 cached tokens: SDPA's `enable_gqa` (what
    transformers uses without padding) against query heads grouped by key/value head (the lean
    step's layout), µs a layer;
(d) the two attention layouts in bfloat16 against float32: teacher-forced on float32's greedy
    tokens for `--prompts` prompts of XSTest's dev half (measured on, never trained on), the mean
    |logit error| and the share of positions whose top token matches float32's.

Configurations alternate within each of `--repeat` rounds and the best round is kept: the CPU is
shared, and runs of one configuration differ by 10% on this machine.

    .venv/bin/python bench/decode_step.py [--model demo] [--tokens 64] [--repeat 5] [--prompts 8]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from harness import PROMPT, xstest_dev
from torch import nn
from transformers import DynamicCache

from app.ml.generation import _pad_id
from app.ml.models import LoadedModel, load_model
from app.serving.decode_step import decode_step, model_step
from app.serving.decoding import Decoder, GenRequest, Prefill
from app.serving.packed import (
    GroupMemberForward,
    _pack,
    _packed_linear,
    pack_linears,
    unpack_linears,
)
from app.serving.sampling import SamplingParams
from app.serving.weights import BatchDeltaHooks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=8, help="(d): XSTest dev prompts")
    args = parser.parse_args()
    lm = load_model(args.model, device="cpu", dtype="bfloat16")
    print(f"demo model: {args.model}, bfloat16, {torch.get_num_threads()} torch threads")
    products(lm, args.repeat)
    decoding(lm, args.tokens, args.repeat)
    attention(lm, args.repeat)
    layouts(args.model, lm, args.prompts)


def _best_of(repeat: int, runs: dict) -> dict[str, float]:
    """Each callable's best result (higher is better) over `repeat` alternating rounds."""
    best: dict[str, float] = {}
    for _ in range(repeat):
        for name, run in runs.items():
            best[name] = max(best.get(name, float("-inf")), run())
    return best


def products(lm: LoadedModel, repeat: int) -> None:
    """(a): the projections and the head as a step meets them, one row, no other work."""
    linears = [m for m in lm.model.modules() if isinstance(m, nn.Linear)]
    separate = [_pack(m.weight) for m in linears]
    pack_linears(lm.model)  # as the engine packs them: q/k/v and gate/up grouped
    forwards = [m.forward for m in linears]
    packs = (f.group._packed if isinstance(f, GroupMemberForward) else f._packed for f in forwards)
    together = list({id(p): p for p in packs}.values())  # a group's matrix once, in step order

    def timed(packs: list[torch.Tensor]):
        inputs = {p.shape: torch.randn(1, 1, p.shape[1], dtype=torch.bfloat16) for p in packs}

        def run() -> float:
            start = time.perf_counter()
            for _ in range(5):
                for packed in packs:
                    _packed_linear(inputs[packed.shape], packed, None)
            return -(time.perf_counter() - start) / 5 * 1000

        return run

    with torch.inference_mode():
        best = _best_of(repeat, {"separate": timed(separate), "grouped": timed(together)})
    print("\n(a) a step's matrix products, one row, ms (best of rounds)")
    print(f"    {len(separate)} packed on their own: {-best['separate']:.2f}")
    print(f"    {len(together)} with q/k/v and gate/up packed as one each: {-best['grouped']:.2f}")


def decoding(lm: LoadedModel, tokens: int, repeat: int) -> None:
    """(b): tokens/s of the engine's cohort at 1, 8 and 32 rows, per configuration."""
    ids = lm.tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=True
    )
    ids = ids if isinstance(ids, list) else ids["input_ids"]
    configs = {
        "model forward, plain weights": (False, False),
        "model forward, packed weights": (True, False),
        "lean step, packed weights (default)": (True, True),
    }

    def run(rows: int, packed: bool, lean: bool):
        def once() -> float:
            unpack_linears(lm.model)
            if packed:
                pack_linears(lm.model)
            step = decode_step(lm.model) if lean else None
            decoder = Decoder(lm, BatchDeltaHooks(lm.model), set(), _pad_id(lm), step)
            params = SamplingParams(max_tokens=tokens, temperature=0.0)
            requests = [GenRequest(ids, None, params, lambda _e: None) for _ in range(rows)]
            prefill = Prefill(decoder, requests)
            prefill.run()
            cohort, _ = prefill.cohort()
            start, steps = time.perf_counter(), 0
            while len(cohort):
                cohort.step()
                steps += 1
            return steps * rows / (time.perf_counter() - start)

        return once

    print(f"\n(b) greedy decoding through the cohort, {len(ids)}-token prompt, {tokens} tokens, "
          "tokens/s (best of rounds)")  # fmt: skip
    print("| configuration | 1 row | 8 rows | 32 rows |\n|---|---|---|---|")
    results = {name: {} for name in configs}
    for rows in (1, 8, 32):
        runs = {name: run(rows, *flags) for name, flags in configs.items()}
        for name, value in _best_of(repeat, runs).items():
            results[name][rows] = value
    for name, by_rows in results.items():
        print(f"| {name} | " + " | ".join(f"{by_rows[r]:.1f}" for r in (1, 8, 32)) + " |")
    unpack_linears(lm.model)
    pack_linears(lm.model)


def attention(lm: LoadedModel, repeat: int) -> None:
    """(c): one token's attention over 100 cached tokens, shaped as the model's."""
    config = lm.model.config
    heads, groups = config.num_attention_heads, config.num_key_value_heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    query = torch.randn(1, heads, 1, dim, dtype=torch.bfloat16)
    key, value = (torch.randn(1, groups, 100, dim, dtype=torch.bfloat16) for _ in range(2))

    def timed(fn):
        def run() -> float:
            start = time.perf_counter()
            for _ in range(200):
                fn()
            return -(time.perf_counter() - start) / 200 * 1e6

        return run

    def enable_gqa():
        return F.scaled_dot_product_attention(query, key, value, enable_gqa=True)

    def grouped():
        packed = query.reshape(1, groups, heads // groups, dim)
        return F.scaled_dot_product_attention(packed, key, value)

    with torch.inference_mode():
        best = _best_of(repeat, {"enable_gqa": timed(enable_gqa), "grouped": timed(grouped)})
    print(f"\n(c) one token's attention, {heads} query heads over {groups} key/value heads, "
          "100 cached tokens, µs a layer (best of rounds)")  # fmt: skip
    print(f"    SDPA enable_gqa: {-best['enable_gqa']:.1f}; query heads grouped: "
          f"{-best['grouped']:.1f}")  # fmt: skip


def layouts(model: str, lm: LoadedModel, prompts: int) -> None:
    """(d): both layouts' logits against float32's, teacher-forced on float32's greedy tokens."""
    reference = load_model(model, device="cpu", dtype="float32")
    step = decode_step(lm.model)
    safe = [row["prompt"] for row in xstest_dev() if row["label"] == "safe"][:prompts]
    errors: dict[str, list[float]] = {"model forward (enable_gqa)": [], "lean step (grouped)": []}
    agree: dict[str, list[float]] = {name: [] for name in errors}
    for prompt in safe:
        ids = lm.tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            greedy = reference.model.generate(ids, max_new_tokens=48, do_sample=False,
                                              pad_token_id=_pad_id(lm))  # fmt: skip
        tokens = greedy[0, ids.shape[1] :].tolist()
        expected = _forced(model_step(reference.model), reference.model, ids, tokens)
        for name, forward in (
            ("model forward (enable_gqa)", model_step(lm.model)),
            ("lean step (grouped)", step),
        ):
            got = _forced(forward, lm.model, ids, tokens)
            errors[name].append(float((got - expected).abs().mean()))
            agree[name].append(float((got.argmax(-1) == expected.argmax(-1)).float().mean()))
    print(f"\n(d) bfloat16 against float32, {len(safe)} XSTest dev safe prompts x 48 tokens, "
          "teacher-forced")  # fmt: skip
    for name in errors:
        print(
            f"    {name}: mean |logit error| {statistics.mean(errors[name]):.4f}, top token "
            f"as float32's at {100 * statistics.mean(agree[name]):.1f}% of positions"
        )


def _forced(forward, model: nn.Module, ids: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """Logits [tokens, vocab] of one-token steps fed `tokens` after a prefill of `ids`."""
    cache, mask = DynamicCache(), torch.ones_like(ids)
    position = torch.tensor([[ids.shape[1] - 1]])
    out = []
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=mask, past_key_values=cache).logits
        for token in tokens:
            out.append(logits[0, -1].float())
            mask = torch.cat([mask, mask.new_ones((1, 1))], dim=1)
            position = position + 1
            logits = forward(torch.tensor([[token]]), mask, position, cache)
    return torch.stack(out)


if __name__ == "__main__":
    main()
