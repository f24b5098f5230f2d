"""Benchmark: corpus-unlearning training throughput, detox's loop vs a plain `transformers` Trainer.

Both runs train the same LoRA (peft, same modules, rank and seed) with the same loss (masked
gradient ascent: minus the mean NLL of the harmful-span tokens) on the same batches of the same
forget set, for the same number of steps, in this process, one after the other. Reported: training
tokens/s (tokens run forward and backward, padding excluded) and the peak resident memory of each.
The forget set is the CrowS-Pairs gender pairs' stereotyping sentences with the words that differ
from their partner as harmful spans (as in bench/transfer.py).

    .venv/bin/python bench/unlearn.py [--model demo] [--steps 20] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from harness import stereotype_documents

from app.ml.bias import filter_pairs, load_pairs
from app.ml.corpus import Document
from app.ml.memory import peak_mb, reset_peak
from app.ml.models import load_model
from app.ml.unlearn import unlearn
from app.ml.unlearn_data import collate, pieces
from app.ml.unlearn_params import UnlearnParams
from app.ml.unlearn_scope import module_names

ROOT = Path(__file__).resolve().parents[1]


class _Pieces(torch.utils.data.Dataset):
    def __init__(self, pieces):
        self.pieces = pieces

    def __len__(self) -> int:
        return len(self.pieces)

    def __getitem__(self, i):
        return self.pieces[i]


def trainer_run(lm, forget: list[Document], params: UnlearnParams) -> tuple[float, int, float]:
    """(seconds, tokens, peak MB) of `transformers.Trainer` with the same loss and LoRA."""
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    names = module_names(lm, params)
    encoded = [p for p in pieces(lm, forget, params.max_length, all_tokens=False) if any(p.harmful)]
    pad = lm.tokenizer.pad_token_id or 0
    tokens = [0]

    class MaskedAscent(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            ids, attention = inputs["input_ids"], inputs["attention_mask"]
            tokens[0] += int(attention.sum())
            logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1]
            nll = F.cross_entropy(logits.float().transpose(1, 2), ids[:, 1:], reduction="none")
            mask = inputs["targets"].float() * attention[:, 1:]
            loss = -(nll * mask).sum() / mask.sum().clamp(min=1)
            return (loss, None) if return_outputs else loss

    def as_mapping(items):  # the Trainer wants a mapping: the same batch as detox's own loop
        batch = collate(items, pad, lm.device)
        return {"input_ids": batch.ids, "attention_mask": batch.attention, "targets": batch.targets}

    torch.manual_seed(params.seed)
    config = LoraConfig(r=params.lora_rank, lora_alpha=params.lora_alpha, target_modules=names)
    model = get_peft_model(lm.model, config)
    args = TrainingArguments(
        output_dir=str(ROOT / "out" / "bench-trainer"),
        per_device_train_batch_size=params.batch_size,
        max_steps=params.steps,
        learning_rate=params.lr,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=lm.device.type == "cpu",
        dataloader_num_workers=0,
        remove_unused_columns=False,
        seed=params.seed,
    )
    trainer = MaskedAscent(
        model=model,
        args=args,
        train_dataset=_Pieces(encoded),
        data_collator=as_mapping,
    )
    reset_peak(lm.device)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    peak = peak_mb(lm.device)
    model.unload()
    return seconds, tokens[0], peak


def detox_run(lm, forget, params) -> tuple[float, int, float]:
    reset_peak(lm.device)
    retain = [Document("The weather was mild and the market was busy.")]
    result = unlearn(lm, forget, retain, "masked_ga", params)
    return result.train_seconds, result.train_tokens, peak_mb(lm.device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    lm = load_model(args.model, device=args.device)
    pairs = filter_pairs(load_pairs(None), types=["gender"])
    forget = stereotype_documents(pairs)
    params = UnlearnParams(
        steps=args.steps, batch_size=args.batch_size, lr=2e-4, max_ppl_increase=None,
        check_every=10_000,
    )  # fmt: skip
    detox_run(lm, forget[:8], params.model_copy(update={"steps": 2}))  # warm-up
    rows = []
    for name, run in (("detox unlearn loop", detox_run), ("transformers Trainer", trainer_run)):
        seconds, tokens, peak = run(lm, forget, params)
        rows.append((name, tokens / seconds, seconds, tokens, peak))
    print(f"\nunlearning throughput: {args.model} on {lm.device}, masked_ga, LoRA "
          f"r={params.lora_rank} on {params.modules}, batch {args.batch_size}, "
          f"{args.steps} steps")  # fmt: skip
    print(f"{'run':<22} {'tokens/s':>9} {'seconds':>8} {'tokens':>7} {'peak MB':>8}")
    for name, rate, seconds, tokens, peak in rows:
        print(f"{name:<22} {rate:>9.1f} {seconds:>8.2f} {tokens:>7} {peak:>8.0f}")
    print(f"ratio detox / Trainer: {rows[0][1] / rows[1][1]:.2f} (target >= 1.0)")


if __name__ == "__main__":
    main()
