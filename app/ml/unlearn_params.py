"""Corpus-unlearning parameters, validated without torch (the API checks jobs before queueing).

Methods (`UnlearnMethod`), after "Towards Transfer Unlearning" (Lu et al. 2024) and the usual
baselines:
- `masked_ga`: gradient ascent on the harmful-span tokens only (the paper's masked unlearning);
- `ga`: gradient ascent on every token of the forget documents;
- `graddiff`: ascent on the harmful-span tokens plus `retain_weight` x the retain NLL;
- `npo`: negative preference optimisation on the harmful-span tokens, `npo_beta` its temperature.
Any method adds `kl_weight` x KL(parent || edited) on the retain text when `kl_weight` > 0.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from app.ml.corpus import DEFAULT_THRESHOLD
from app.ml.params import Params

UnlearnMethod = Literal["masked_ga", "ga", "graddiff", "npo"]
METHODS: tuple[str, ...] = ("masked_ga", "ga", "graddiff", "npo")
MLP_OUT = "mlp_out"  # the architecture's MLP output projection, found per model family


class UnlearnParams(Params):
    steps: int = Field(30, ge=1, le=100_000, description="optimiser steps (at most)")
    lr: float = Field(2e-4, gt=0, le=1, description="AdamW learning rate")
    batch_size: int = Field(4, ge=1, le=256, description="forget documents per micro-batch")
    grad_accum: int = Field(1, ge=1, le=256, description="micro-batches per optimiser step")
    max_length: int = Field(256, ge=8, le=131_072, description="tokens per training piece")
    scope: Literal["lora", "dense"] = Field(
        "lora", description='"lora" (peft; stored as an exact low-rank delta) or "dense"'
    )
    modules: list[str] = Field(
        default_factory=lambda: [MLP_OUT],
        min_length=1,
        max_length=16,
        description='modules to tune inside each decoder layer: "mlp_out" or a module-name '
        'suffix such as "down_proj", "q_proj", "mlp.c_proj"',
    )
    layers: list[int] | None = Field(
        None, max_length=512, description="decoder layers to tune (None: all of them)"
    )
    lora_rank: int = Field(8, ge=1, le=1024)
    lora_alpha: float = Field(16.0, gt=0, le=4096)
    retain_weight: float = Field(1.0, ge=0, le=100, description="graddiff: retain NLL weight")
    kl_weight: float = Field(
        0.0, ge=0, le=100, description="KL(parent || edited) on retain text, any method (0: off)"
    )
    npo_beta: float = Field(0.1, gt=0, le=100, description="npo: inverse temperature")
    max_ppl_increase: float | None = Field(
        0.10,
        gt=0,
        le=100,
        description="stop when retain perplexity exceeds the parent's by this fraction "
        "(0.10 = +10%); None: no guard",
    )
    check_every: int = Field(5, ge=1, le=10_000, description="steps between guard checks")
    stop_forget_nll: float | None = Field(
        None, gt=0, le=1000, description="stop once the forget NLL reaches this (None: off)"
    )
    seed: int = Field(0, ge=0, le=2**32 - 1, description="same seed, same data: same result")
    lexicon: list[str] = Field(
        default_factory=list, max_length=10_000, description="words always marked harmful"
    )
    span_threshold: float = Field(
        DEFAULT_THRESHOLD, ge=0, le=1, description="classifier score that marks a word harmful"
    )

    @model_validator(mode="after")
    def _layers_distinct(self) -> UnlearnParams:
        if self.layers is not None:
            if any(layer < 0 for layer in self.layers):
                raise ValueError("layers must be >= 0")
            if len(set(self.layers)) != len(self.layers):
                raise ValueError("layers must not repeat")
        return self
