"""What every DINM edit shares: the locator of the "toxic layer" and the result of an edit.

The locator compares the hidden states of the safe and the unsafe response layer by layer; the
layer where they differ most is the one DINM edits (`app.ml.dinm` one instance at a time,
`app.ml.dinm_joint` all at once).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from app.ml.deltas import Delta
from app.ml.models import LoadedModel
from app.ml.runners import run_layers
from app.ml.safeedit import SafeEditInstance

Progress = Callable[[str, float], None]
CancelCheck = Callable[[], bool]


@dataclass
class DinmResult:
    delta: Delta
    layer: int  # the located (or given) layer; `layers` lists every edited one
    distances: list[float]
    losses: list[float]
    edit_seconds: float
    warnings: list[str] = field(default_factory=list)
    layers: list[int] = field(default_factory=list)


def layer_distances(lm: LoadedModel, instance: SafeEditInstance, skip: int = 0) -> list[float]:
    """L2 distance between each decoder layer's hidden states for the safe and unsafe response.

    Each response is run alone, so there is no padding; the distance covers the positions both
    responses have (the reference implementation pads them together and counts pad positions),
    from position `skip` on. The first position is an attention sink: its hidden state grows a
    few huge, nearly content-independent components, so two responses whose first tokens differ
    can get a distance dominated by that one position and nearly flat over the layers
    (`skip=1` leaves it out; the paper's locator, `skip=0`, counts it).
    """
    states = [
        _layer_outputs(lm, text) for text in (instance.safe_generation, instance.unsafe_generation)
    ]
    common = min(states[0][0].shape[0], states[1][0].shape[0])
    skip = min(skip, common - 1)
    return [
        torch.linalg.vector_norm((safe[skip:common] - unsafe[skip:common]).float()).item()
        for safe, unsafe in zip(*states, strict=True)
    ]


def locate_toxic_layer(
    lm: LoadedModel, instance: SafeEditInstance, skip: int = 0
) -> tuple[int, list[float]]:
    """The layer with the largest distance (the lowest such layer on a tie), and all distances."""
    distances = layer_distances(lm, instance, skip)
    return ranked(distances)[0], distances


def ranked(distances: list[float]) -> list[int]:
    """Layers by decreasing distance, the lower layer first on a tie."""
    return sorted(range(len(distances)), key=lambda i: (-distances[i], i))


def _layer_outputs(lm: LoadedModel, text: str) -> list[torch.Tensor]:
    ids = lm.tokenizer(text, return_tensors="pt")["input_ids"][:, : lm.context_length]
    outputs: list[torch.Tensor] = []

    def keep(_module: nn.Module, _args: tuple, output: object) -> None:
        outputs.append((output[0] if isinstance(output, tuple) else output)[0].detach())

    hooks = [layer.register_forward_hook(keep) for layer in lm.adapter.layers]
    try:
        run_layers(lm.model, ids.to(lm.device))
    finally:
        for hook in hooks:
            hook.remove()
    return outputs
