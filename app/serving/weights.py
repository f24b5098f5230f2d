"""A version's summed deltas, laid out for the forward hooks, and the hooks themselves.

Every edited module is an `nn.Linear` (weight [out, in]) or GPT-2's `Conv1D` (weight [in, out]);
deltas are stored in the parameter's own layout. `ModuleDelta.weight` is kept as the matrix M with
output += x @ M, i.e. ΔWᵀ for a Linear and ΔW itself for a Conv1D, so the hook needs no case.

`BatchDeltaHooks` adds, inside each edited module, each row's own version delta to the base
projection computed for the whole batch: the base weights are shared by every version and never
copied. Which row runs which version is a `RowPlan`, built when a batch's rows change and put in
use around each forward (`using`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from app.ml.deltas import Delta, fingerprint
from app.serving.errors import ModelLoadError


@dataclass(frozen=True)
class ModuleDelta:
    weight: torch.Tensor | None  # M with output += x @ M
    bias: torch.Tensor | None


@dataclass(frozen=True)
class VersionWeights:
    """One version's whole chain, summed per edited module."""

    name: str
    modules: dict[str, ModuleDelta]

    @property
    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size()
            for d in self.modules.values()
            for t in (d.weight, d.bias)
            if t is not None
        )


def version_weights(
    model: nn.Module,
    name: str,
    deltas: Sequence[Delta],
    *,
    base_fingerprints: dict[str, str] | None = None,
) -> VersionWeights:
    """Sum a chain's deltas (base first) into per-module updates; every delta's base fingerprint
    is checked against the model (`base_fingerprints` caches per-parameter fingerprints)."""
    cache = base_fingerprints if base_fingerprints is not None else {}
    for delta in deltas:
        if not delta.base_fingerprint:
            continue
        key = "\n".join(sorted(delta.updates))
        if key not in cache:
            cache[key] = fingerprint(model, delta.updates)
        if cache[key] != delta.base_fingerprint:
            raise ModelLoadError(
                f"version {name!r}: a delta was made for a different base model "
                f"(fingerprint {delta.base_fingerprint[:12]}, "
                f"the loaded base's is {cache[key][:12]})"
            )
    total = sum(deltas[1:], deltas[0]) if deltas else Delta({})
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    weights: dict[str, torch.Tensor] = {}
    biases: dict[str, torch.Tensor] = {}
    for param_name, update in total.updates.items():
        module_name, _, attr = param_name.rpartition(".")
        module = modules.get(module_name)
        if param_name not in params or not isinstance(module, nn.Linear | Conv1D):
            raise ModelLoadError(
                f"version {name!r} edits {param_name!r}, which is not the weight or bias of a "
                "linear layer of this model: it cannot be served unmerged"
            )
        param = params[param_name]
        if tuple(param.shape) != update.shape:
            raise ModelLoadError(
                f"version {name!r}: delta for {param_name!r} has shape {update.shape}, "
                f"the model's is {tuple(param.shape)}"
            )
        value = update.dense().to(param.device, torch.float32)
        if not torch.isfinite(value).all():
            raise ModelLoadError(f"version {name!r}: delta for {param_name!r} is not finite")
        if attr == "weight":
            matrix = value.t() if isinstance(module, nn.Linear) else value
            weights[module_name] = matrix.to(param.dtype)  # a view: no copy of the delta
        elif attr == "bias":
            biases[module_name] = value.to(param.dtype)
        else:
            raise ModelLoadError(f"version {name!r}: cannot serve a delta of {param_name!r}")
    names = sorted(set(weights) | set(biases))
    return VersionWeights(name, {m: ModuleDelta(weights.get(m), biases.get(m)) for m in names})


@dataclass(frozen=True)
class RowPlan:
    """Which rows of a batch run which version: per edited module, (row index or None for every
    row, delta). Built once per batch membership (`BatchDeltaHooks.plan`), used per forward."""

    groups: dict[str, list[tuple[torch.Tensor | None, ModuleDelta]]]
    batch: int


class BatchDeltaHooks:
    """Forward hooks that add per-row version deltas; a no-op while no plan is in use."""

    def __init__(self, model: nn.Module):
        self._modules = dict(model.named_modules())
        self._handles: dict[str, torch.utils.hooks.RemovableHandle] = {}
        self._plan = RowPlan({}, 0)

    def plan(self, rows: Sequence[VersionWeights | None]) -> RowPlan:
        """The plan for a batch whose row i runs `rows[i]` (None: the base model)."""
        by_version: dict[int, tuple[VersionWeights, list[int]]] = {}
        for i, weights in enumerate(rows):
            if weights is not None:
                by_version.setdefault(id(weights), (weights, []))[1].append(i)
        groups: dict[str, list[tuple[torch.Tensor | None, ModuleDelta]]] = {}
        for weights, indices in by_version.values():
            every_row = len(indices) == len(rows)
            for module_name, delta in weights.modules.items():
                self._ensure_hook(module_name)
                device = (delta.weight if delta.weight is not None else delta.bias).device
                index = None if every_row else torch.tensor(indices, device=device)
                groups.setdefault(module_name, []).append((index, delta))
        return RowPlan(groups, len(rows))

    @contextmanager
    def using(self, plan: RowPlan) -> Iterator[None]:
        """The forwards inside run `plan`; any other forward (a judge's, say) runs the base."""
        self._plan = plan
        try:
            yield
        finally:
            self._plan = RowPlan({}, 0)

    def remove(self) -> None:
        for handle in self._handles.values():
            handle.remove()
        self._handles = {}
        self._plan = RowPlan({}, 0)

    def _ensure_hook(self, module_name: str) -> None:
        if module_name in self._handles:
            return
        module = self._modules[module_name]

        def hook(_module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            plan = self._plan
            groups = plan.groups.get(module_name)
            if not groups:
                return None
            x, shape = args[0], output.shape
            if x.shape[0] != plan.batch:  # rows flattened to [batch * tokens, features] (OPT)
                x = x.reshape(plan.batch, -1, x.shape[-1])
                output = output.reshape(plan.batch, -1, shape[-1])
            for index, delta in groups:
                rows = x if index is None else x.index_select(0, index)
                if delta.weight is None:
                    extra = delta.bias.expand(*rows.shape[:-1], delta.bias.shape[-1])
                else:
                    extra = rows @ delta.weight
                    if delta.bias is not None:
                        extra = extra + delta.bias
                output = output + extra if index is None else output.index_add(0, index, extra)
            output = output.reshape(shape)
            return output

        self._handles[module_name] = module.register_forward_hook(hook)
