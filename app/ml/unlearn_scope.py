"""What corpus unlearning trains: the chosen modules, and a LoRA or dense update of them.

`module_names` resolves `params.modules` inside `params.layers` to full module names. `trainable`
puts a trainable update on them, LoRA through `peft` (stored as the exact low-rank delta B·A·scale)
or dense float32 shifts (see `weight_shift`), and takes it away afterwards: the base weights are
never written, and every parameter's `requires_grad` is as it was.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from app.ml.deltas import DenseUpdate, LowRankUpdate, Update
from app.ml.errors import InputError
from app.ml.models import LoadedModel
from app.ml.unlearn_params import MLP_OUT, UnlearnParams
from app.ml.weight_shift import shifts_disabled, weight_shifts


def module_names(lm: LoadedModel, params: UnlearnParams) -> list[str]:
    """Full names of the modules to tune: `params.modules` inside each of `params.layers`."""
    adapter = lm.adapter
    layers = params.layers if params.layers is not None else range(adapter.num_layers)
    prefix = adapter.spec.layers
    names: list[str] = []
    for layer in layers:
        adapter.check_layer(layer)
        inside = dict(adapter.layers[layer].named_modules())
        for wanted in params.modules:
            if wanted == MLP_OUT:
                names.append(adapter.mlp_out_param_name(layer).removesuffix(".weight"))
                continue
            found = [
                n
                for n, m in inside.items()
                if (n == wanted or n.endswith(f".{wanted}")) and isinstance(m, nn.Linear | Conv1D)
            ]
            if not found:
                raise InputError(
                    f"params.modules: layer {layer} has no linear module named {wanted!r} "
                    f"(its linear modules: {', '.join(_linear_names(inside)) or 'none'})"
                )
            names += [f"{prefix}.{layer}.{n}" for n in found]
    return list(dict.fromkeys(names))


def _linear_names(modules: dict[str, nn.Module]) -> list[str]:
    return [n for n, m in modules.items() if isinstance(m, nn.Linear | Conv1D)]


class Trainable:
    """The trainable update of the chosen modules: its parameters, a way to switch it off (the
    parent model), a snapshot/restore for the guard, and the resulting deltas."""

    parameters: list[nn.Parameter]

    def disabled(self) -> AbstractContextManager[None]: ...
    def updates(self) -> dict[str, Update]: ...

    def snapshot(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.parameters]

    def restore(self, saved: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for param, value in zip(self.parameters, saved, strict=True):
                param.copy_(value)


@contextmanager
def trainable(lm: LoadedModel, names: list[str], params: UnlearnParams) -> Iterator[Trainable]:
    """While inside, the modules `names` carry the update of `params.scope`, to be trained."""
    modules = dict(lm.model.named_modules())
    grads = {n: p.requires_grad for n, p in lm.model.named_parameters()}
    try:
        if params.scope == "dense":
            with weight_shifts([modules[n] for n in names]) as shifts:
                yield _DenseTrainable(lm, names, shifts)
        else:
            with _lora(lm, names, params) as lora:
                yield lora
    finally:
        for name, param in lm.model.named_parameters():
            param.requires_grad_(grads.get(name, param.requires_grad))


class _DenseTrainable(Trainable):
    def __init__(self, lm: LoadedModel, names: list[str], shifts):
        self._lm, self._names, self._shifts = lm, names, shifts
        self.parameters = [s.delta for s in shifts]
        for param in lm.model.parameters():
            param.requires_grad_(False)
        for param in self.parameters:
            param.requires_grad_(True)

    def disabled(self) -> AbstractContextManager[None]:
        return shifts_disabled(self._shifts)

    def updates(self) -> dict[str, Update]:
        return {
            f"{name}.weight": DenseUpdate(shift.delta.detach().to(self._lm.dtype).clone())
            for name, shift in zip(self._names, self._shifts, strict=True)
        }


class _LoraTrainable(Trainable):
    def __init__(self, lm: LoadedModel, peft_model, names: list[str]):
        self._lm, self._peft, self._names = lm, peft_model, names
        self.parameters = [p for p in peft_model.parameters() if p.requires_grad]

    def disabled(self) -> AbstractContextManager[None]:
        return self._peft.disable_adapter()

    def updates(self) -> dict[str, Update]:
        """Exact low-rank deltas in each parameter's own layout: W' = W + B·A·scale."""
        modules = dict(self._lm.model.named_modules())
        updates: dict[str, Update] = {}
        for name in self._names:
            layer = modules[name]
            a = layer.lora_A["default"].weight.detach().float()  # [r, in]
            b = layer.lora_B["default"].weight.detach().float() * layer.scaling["default"]
            if isinstance(layer.get_base_layer(), Conv1D):  # weight is [in, out]: transpose
                a, b = b.t().contiguous(), a.t().contiguous()
            dtype = self._lm.dtype
            updates[f"{name}.weight"] = LowRankUpdate(a=a.to(dtype), b=b.to(dtype))
        return updates


@contextmanager
def _lora(lm: LoadedModel, names: list[str], params: UnlearnParams) -> Iterator[_LoraTrainable]:
    from peft import LoraConfig, get_peft_model  # only LoRA runs need peft

    model = lm.model
    config = LoraConfig(
        r=params.lora_rank,
        lora_alpha=params.lora_alpha,
        lora_dropout=0.0,
        target_modules=names,
        fan_in_fan_out=isinstance(dict(model.named_modules())[names[0]], Conv1D),
    )
    peft_model = get_peft_model(model, config)
    try:
        yield _LoraTrainable(lm, peft_model, names)
    finally:
        peft_model.unload()  # the original modules back in place, not merged
