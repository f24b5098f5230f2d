"""Where the editable parts of each architecture live.

DINM edits one decoder layer's MLP output projection and, for its fast path, runs the layers above
it and the output head by hand. Each family keeps those modules under different names; an
`ArchSpec` records them, and `ModelAdapter` resolves them on a loaded model. Specs are tried in
order and the first whose paths all resolve wins, so a new model type of a known family works
without being listed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from app.ml.errors import InputError, UnknownArchitectureError


@dataclass(frozen=True)
class ArchSpec:
    family: str
    layers: str  # the ModuleList of decoder layers
    mlp_out: str  # relative to one decoder layer
    final_norms: tuple[str, ...]  # applied in order after the last layer; missing ones are skipped
    heads: tuple[str, ...] = ("lm_head",)  # hidden states -> logits; the first that exists
    transposed: bool = False  # GPT-2's Conv1D stores its weight as [in, out]


SPECS: tuple[ArchSpec, ...] = (
    ArchSpec("llama", "model.layers", "mlp.down_proj", ("model.norm",)),
    ArchSpec("gpt2", "transformer.h", "mlp.c_proj", ("transformer.ln_f",), transposed=True),
    ArchSpec(
        "gpt-neox",
        "gpt_neox.layers",
        "mlp.dense_4h_to_h",
        ("gpt_neox.final_layer_norm",),
        ("embed_out", "lm_head"),
    ),
    ArchSpec(
        "opt",
        "model.decoder.layers",
        "fc2",
        ("model.decoder.final_layer_norm", "model.decoder.project_out"),
    ),
    ArchSpec("phi", "model.layers", "mlp.fc2", ("model.final_layernorm",)),
    ArchSpec("falcon", "transformer.h", "mlp.dense_4h_to_h", ("transformer.ln_f",)),
    ArchSpec("gptj", "transformer.h", "mlp.fc_out", ("transformer.ln_f",)),
)

SUPPORTED = (
    "Llama/Mistral/Qwen2/Gemma/Phi-3 (mlp.down_proj), GPT-2 (mlp.c_proj), GPT-NeoX "
    "(mlp.dense_4h_to_h), OPT (fc2), Phi (mlp.fc2), Falcon (mlp.dense_4h_to_h), GPT-J (mlp.fc_out)"
)


def _resolve(root: nn.Module, path: str) -> nn.Module | None:
    module: nn.Module | None = root
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def _head(model: nn.Module, spec: ArchSpec) -> nn.Module | None:
    return next((m for m in (_resolve(model, p) for p in spec.heads) if m is not None), None)


class ModelAdapter:
    """Uniform access to the decoder layers, MLP output projections and head of a causal LM."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.spec = self._match(model)
        self.layers: nn.ModuleList = _resolve(model, self.spec.layers)  # type: ignore[assignment]

    @staticmethod
    def _match(model: nn.Module) -> ArchSpec:
        for spec in SPECS:
            layers = _resolve(model, spec.layers)
            if (
                isinstance(layers, nn.ModuleList)
                and len(layers) > 0
                and _resolve(layers[0], spec.mlp_out) is not None
                and _head(model, spec) is not None
            ):
                return spec
        config = getattr(model, "config", None)
        name = getattr(config, "model_type", None) or type(model).__name__
        arch = ",".join(getattr(config, "architectures", None) or [type(model).__name__])
        raise UnknownArchitectureError(
            f"unsupported architecture {name!r} ({arch}): no decoder layers with an editable MLP "
            f"output projection found; supported: {SUPPORTED}"
        )

    @property
    def family(self) -> str:
        return self.spec.family

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def check_layer(self, layer: int) -> int:
        if not 0 <= layer < self.num_layers:
            raise InputError(
                f"layer {layer} is out of range: the model has layers 0..{self.num_layers - 1}"
            )
        return layer

    def mlp_out(self, layer: int) -> nn.Module:
        module = _resolve(self.layers[self.check_layer(layer)], self.spec.mlp_out)
        if module is None:  # only the first layer is checked on matching; MoE layers differ
            raise InputError(
                f"layer {layer} has no {self.spec.mlp_out} to edit (a mixture-of-experts layer?); "
                "choose another layer"
            )
        return module

    def mlp_out_param_name(self, layer: int) -> str:
        """Full parameter name of the projection's weight, as in `model.named_parameters()`."""
        self.mlp_out(layer)
        return f"{self.spec.layers}.{layer}.{self.spec.mlp_out}.weight"

    @property
    def head(self) -> nn.Module:
        """The output head (hidden states -> logits)."""
        return _head(self.model, self.spec)  # type: ignore[return-value]

    def logits_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm(s) and output head applied to the last decoder layer's output."""
        for path in self.spec.final_norms:
            norm = _resolve(self.model, path)
            if norm is not None:
                hidden = norm(hidden)
        logits = self.head(hidden)
        config = getattr(self.model, "config", None)
        # Some families rescale logits after the head: Cohere multiplies, Granite divides.
        if scale := getattr(config, "logit_scale", None):
            logits = logits * scale
        if divisor := getattr(config, "logits_scaling", None):
            logits = logits / divisor
        cap = getattr(config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits
