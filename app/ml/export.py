"""Exports of a version (its chain of deltas, base first) in formats other tools load.

Pure torch + transformers + peft + safetensors: no HTTP, no database. Every function checks the
chain against the model first (parameters, shapes, base fingerprints, as `apply_deltas` does) and
none writes the model's weights or config, so a model serving generations meanwhile is safe.

- `save_peft_adapter`: a PEFT LoRA adapter folder (`adapter_config.json` and
  `adapter_model.safetensors`, tensors named `base_model.model.<module>.lora_A.weight` and
  `.lora_B.weight`), as `peft.PeftModel.from_pretrained` and vLLM's LoRA serving read it.
  Low-rank updates are exported exactly (several low-rank updates of one module sum to their
  stacked factors, still exact); a dense update by truncated SVD at the smallest rank whose
  relative Frobenius error ‖ΔW − BA‖ / ‖ΔW‖, measured, is at most `max_rel_error`
  (`RankBoundError` when that takes more than `max_rank`). Per-module ranks go in `rank_pattern`
  and `lora_alpha` equals the rank everywhere (`alpha_pattern` too), so every scaling is exactly
  1, in peft as in vLLM (alpha / r). The rank and measured error of every module are recorded in
  the safetensors metadata (key `detox.export`) and in `detox_export.json` beside it.
- `merged_weights` + `save_merged`: the base with the chain added, as a full Hugging Face model
  folder (safetensors, config, generation config, tokenizer). Only the edited parameters are
  computed anew (extra memory: their size; values exactly as `apply_deltas` computes them); the
  rest is written straight from the model's own tensors, and the config from a copy
  (`save_pretrained` stamps `architectures` into the config, which the base fingerprint covers).
- `summed_delta`: the chain summed into one delta, fingerprinted on the model over every
  parameter it edits, so `apply_deltas(fresh_base, [summed])` accepts it.

Layouts: an `nn.Linear` weight is [out, in]; GPT-2's `Conv1D` stores [in, out] and is exported
with `fan_in_fan_out` (lora_B @ lora_A is then the transpose of the stored update).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from app.ml.deltas import Delta, LowRankUpdate, Update, check_deltas, fingerprint
from app.ml.errors import DeltaError, ExportError, NotExpressibleError, RankBoundError

PEFT_FORMAT = "detox.peft/1"
MERGED_FORMAT = "detox.merged/1"
DEFAULT_MAX_REL_ERROR = 1e-3
MIN_REL_ERROR = 1e-6  # what float32 factors can still be measured to meet
ADAPTER_WEIGHTS = "adapter_model.safetensors"
REPORT_FILE = "detox_export.json"
METADATA_KEY = "detox.export"
MERGED_SHARD_SIZE = "2GB"  # bounds the host memory one shard takes while it is written


@dataclass(frozen=True)
class LoraFactors:
    """One module's update as LoRA factors: lora_B @ lora_A is the update in [out, in] layout."""

    a: torch.Tensor  # lora_A.weight [rank, in]
    b: torch.Tensor  # lora_B.weight [out, rank]
    rel_error: float  # ‖ΔW − BA‖_F / ‖ΔW‖_F as measured (0 for exact factors)
    method: str  # "exact" (the delta's own low-rank factors) or "svd" (a truncated SVD)

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


@dataclass(frozen=True)
class AdapterReport:
    """What an exported adapter holds: its global rank and each module's rank and error."""

    r: int
    fan_in_fan_out: bool
    max_rel_error: float
    max_rank: int | None
    modules: dict[str, dict[str, Any]]  # module -> {"rank", "rel_error", "method"}

    @property
    def rel_error(self) -> float:
        """The largest relative error of any module."""
        return max((m["rel_error"] for m in self.modules.values()), default=0.0)

    @property
    def rank_pattern(self) -> dict[str, int]:
        return {name: m["rank"] for name, m in self.modules.items() if m["rank"] != self.r}

    def to_json(self) -> dict[str, Any]:
        return {
            "format": PEFT_FORMAT,
            "r": self.r,
            "lora_alpha": self.r,
            "fan_in_fan_out": self.fan_in_fan_out,
            "max_rel_error": self.max_rel_error,
            "max_rank": self.max_rank,
            "rel_error": self.rel_error,
            "modules": self.modules,
        }


# -- PEFT LoRA adapter -----------------------------------------------------------------------


def lora_factors(
    model: nn.Module,
    deltas: Sequence[Delta],
    *,
    max_rel_error: float = DEFAULT_MAX_REL_ERROR,
    max_rank: int | None = None,
) -> dict[str, LoraFactors]:
    """The chain's summed update of every edited module as LoRA factors, by module path."""
    check_bounds(max_rel_error=max_rel_error, max_rank=max_rank)
    total = _total(model, deltas)
    modules = dict(model.named_modules())
    targets = {name: _lora_module(modules, name) for name in sorted(total.updates)}
    kinds = {type(module) for _, module in targets.values()}
    if len(kinds) > 1:
        raise NotExpressibleError(
            "the version edits both nn.Linear and Conv1D weights; one LoRA adapter has one "
            "fan_in_fan_out for all its modules: export `merged` or `delta` instead"
        )
    factors: dict[str, LoraFactors] = {}
    for param_name, (module_name, module) in targets.items():
        factors[module_name] = _factors(
            module_name,
            total.updates[param_name],
            transposed=isinstance(module, Conv1D),
            device=module.weight.device,
            bound=max_rel_error,
            max_rank=max_rank,
        )
    return factors


def save_peft_adapter(
    model: nn.Module,
    deltas: Sequence[Delta],
    folder: Path,
    *,
    base_model_name_or_path: str,
    max_rel_error: float = DEFAULT_MAX_REL_ERROR,
    max_rank: int | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> AdapterReport:
    """Write the chain as a PEFT LoRA adapter into `folder`; `metadata` (JSON) is recorded with
    the report in the safetensors metadata and in `detox_export.json`."""
    from peft import LoraConfig  # only adapter exports need peft

    factors = lora_factors(model, deltas, max_rel_error=max_rel_error, max_rank=max_rank)
    modules = dict(model.named_modules())
    report = AdapterReport(
        r=max(f.rank for f in factors.values()),
        fan_in_fan_out=isinstance(modules[next(iter(factors))], Conv1D),
        max_rel_error=max_rel_error,
        max_rank=max_rank,
        modules={
            name: {"rank": f.rank, "rel_error": f.rel_error, "method": f.method}
            for name, f in factors.items()
        },
    )
    config = LoraConfig(
        r=report.r,
        lora_alpha=report.r,
        rank_pattern=report.rank_pattern,
        alpha_pattern=report.rank_pattern,  # alpha = rank: every scaling is 1
        target_modules=sorted(factors),
        fan_in_fan_out=report.fan_in_fan_out,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model_name_or_path,
        inference_mode=True,
    )
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(folder))
    tensors: dict[str, torch.Tensor] = {}
    for name, f in factors.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = f.a.detach().cpu().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = f.b.detach().cpu().contiguous()
    record = json.dumps({**(metadata or {}), **report.to_json()}, sort_keys=True)
    save_file(tensors, folder / ADAPTER_WEIGHTS, metadata={"format": "pt", METADATA_KEY: record})
    _write_report(folder, json.loads(record))
    return report


def check_bounds(*, max_rel_error: float, max_rank: int | None) -> None:
    """Refuse (ExportError) a bound float32 cannot reach or a rank below 1."""
    if not MIN_REL_ERROR <= max_rel_error < 1:
        raise ExportError(
            f"max_rel_error must be at least {MIN_REL_ERROR:g} and below 1, got {max_rel_error:g}"
        )
    if max_rank is not None and max_rank < 1:
        raise ExportError(f"max_rank must be at least 1, got {max_rank}")


def _lora_module(modules: dict[str, nn.Module], param_name: str) -> tuple[str, nn.Module]:
    module_name, _, attr = param_name.rpartition(".")
    module = modules.get(module_name)
    if isinstance(module, nn.Linear | Conv1D) and attr == "bias":
        raise NotExpressibleError(
            f"the version changes {param_name}, a bias: a LoRA adapter cannot hold a bias "
            "change; export `merged` or `delta` instead"
        )
    if not isinstance(module, nn.Linear | Conv1D) or attr != "weight":
        raise NotExpressibleError(
            f"the version changes {param_name}, which is not the weight of a linear layer "
            "(nn.Linear or Conv1D): export `merged` or `delta` instead"
        )
    return module_name, module


def _factors(
    name: str,
    update: Update,
    *,
    transposed: bool,
    device: torch.device,
    bound: float,
    max_rank: int | None,
) -> LoraFactors:
    if isinstance(update, LowRankUpdate) and (max_rank is None or update.a.shape[0] <= max_rank):
        a, b = update.a.float(), update.b.float()
        if transposed:  # stored [in, out] = b @ a, so [out, in] = a.T @ b.T
            a, b = b.t(), a.t()
        return LoraFactors(a.contiguous(), b.contiguous(), 0.0, "exact")
    matrix = update.dense().to(device, torch.float32)
    return _truncated_svd(name, matrix.t() if transposed else matrix, bound, max_rank)


def _truncated_svd(
    name: str, matrix: torch.Tensor, bound: float, max_rank: int | None
) -> LoraFactors:
    """The smallest-rank factors B @ A of `matrix` [out, in] within `bound` (measured)."""
    out_features, in_features = matrix.shape
    norm = float(torch.linalg.matrix_norm(matrix))
    if norm == 0.0:  # nothing changes: a zero rank-1 adapter keeps the module in the config
        zeros = matrix.new_zeros
        return LoraFactors(zeros(1, in_features), zeros(out_features, 1), 0.0, "svd")
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    energy = s.double().square()
    # predicted[k]: the relative error of the rank-k truncation (Eckart-Young), k = 0..full.
    predicted = [*(energy.flip(0).cumsum(0).flip(0) / energy.sum()).sqrt().tolist(), 0.0]
    full = len(s)
    limit = full if max_rank is None else min(max_rank, full)
    needed = next(k for k in range(1, full + 1) if predicted[k] <= bound)
    rank = needed
    while rank <= limit:
        root = s[:rank].sqrt()
        b = (u[:, :rank] * root).contiguous()
        a = (root[:, None] * vh[:rank]).contiguous()
        error = float(torch.linalg.matrix_norm(matrix - b @ a)) / norm
        if error <= bound:
            return LoraFactors(a, b, error, "svd")
        rank += 1  # rounding put the measured error just over: one more singular value
    if needed <= limit:
        raise RankBoundError(
            f"{name}: even a rank-{limit} LoRA misses the relative error bound {bound:g} in "
            "float32; ask for a larger max_rel_error"
        )
    raise RankBoundError(
        f"{name}: meeting the relative error bound {bound:g} takes a rank-{needed} LoRA, over "
        f"max_rank={limit}, where the error would be {predicted[limit]:.3g}; raise max_rank or "
        "max_rel_error, or export `merged` or `delta`"
    )


# -- merged model ----------------------------------------------------------------------------


def merged_weights(model: nn.Module, deltas: Sequence[Delta]) -> dict[str, torch.Tensor]:
    """The new values of the parameters the chain edits (base + summed update, computed as
    `apply_deltas` does, in the parameter's dtype); the model itself is left alone."""
    total = _total(model, deltas)
    params = dict(model.named_parameters())
    tied = _tied(model)
    merged: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, update in total.updates.items():
            if name in tied:
                raise NotExpressibleError(
                    f"{name} is tied to {', '.join(tied[name])}: a merged model cannot change "
                    "one without the other; export `delta` instead"
                )
            param = params[name]
            value = param.float() + update.dense().to(param.device, torch.float32)
            if not torch.isfinite(value).all():
                raise DeltaError(f"applying the delta makes {name} non-finite")
            merged[name] = value.to(param.dtype)
    return merged


def save_merged(
    model: nn.Module,
    tokenizer: Any,
    merged: Mapping[str, torch.Tensor],
    folder: Path,
    *,
    metadata: Mapping[str, Any] | None = None,
    max_shard_size: str = MERGED_SHARD_SIZE,
) -> None:
    """Write `model` with `merged` in place of those parameters as a Hugging Face model folder
    (safetensors shards, config, generation config, tokenizer), and `detox_export.json`."""
    state = model.state_dict()  # the live tensors themselves: nothing is copied
    unknown = sorted(set(merged) - set(state))
    if unknown:
        raise DeltaError(f"the model has no parameter {unknown[0]!r}")
    state.update(merged)
    folder.mkdir(parents=True, exist_ok=True)
    _shell(model).save_pretrained(folder, state_dict=state, max_shard_size=max_shard_size)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    record = {"format": MERGED_FORMAT, **(metadata or {}), "params": sorted(merged)}
    _write_report(folder, record)


def _shell(model: nn.Module) -> Any:
    """A weightless (meta) copy of `model` with a copy of its config: `save_pretrained` on it
    writes the config, generation config and the given state dict, and touches nothing live."""
    with torch.device("meta"):
        shell = type(model)(copy.deepcopy(model.config))
    shell.to(dtype=next(model.parameters()).dtype)
    if getattr(model, "generation_config", None) is not None:
        shell.generation_config = copy.deepcopy(model.generation_config)
    if getattr(model, "_weight_conversions", None) is not None:  # how it was loaded: reverted
        shell._weight_conversions = model._weight_conversions
    return shell


def _tied(model: nn.Module) -> dict[str, list[str]]:
    """Parameter name -> the other names sharing its storage (tied weights)."""
    by_storage: dict[tuple[int, tuple[int, ...]], list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_storage.setdefault((param.data_ptr(), tuple(param.shape)), []).append(name)
    return {
        name: [other for other in names if other != name]
        for names in by_storage.values()
        if len(names) > 1
        for name in names
    }


# -- one summed delta ------------------------------------------------------------------------


def summed_delta(
    model: nn.Module, deltas: Sequence[Delta], *, meta: Mapping[str, str] | None = None
) -> Delta:
    """The chain as one delta, fingerprinted on `model` (which must hold the base weights)."""
    total = _total(model, deltas)
    return Delta(dict(total.updates), fingerprint(model, total.updates), dict(meta or {}))


def _total(model: nn.Module, deltas: Sequence[Delta]) -> Delta:
    check_deltas(model, deltas)
    total = sum(deltas[1:], deltas[0]) if deltas else Delta({})
    if not total.updates:
        raise ExportError("the version changes no weights: there is nothing to export")
    return total


def _write_report(folder: Path, record: Mapping[str, Any]) -> None:
    (folder / REPORT_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def adapter_rank_problem(rank: int, max_lora_rank: int) -> str | None:
    """Why a version whose exact adapter has `rank` cannot be a vLLM LoRA adapter, or None (the
    vLLM engine's refusal and the workers' warning say the same)."""
    if rank <= max_lora_rank:
        return None
    return (
        f"its exact LoRA adapter has rank {rank}, above the vLLM server's max_lora_rank "
        f"{max_lora_rank} (DETOX_VLLM_MAX_LORA_RANK); make the edit with params.rank <= "
        f"{max_lora_rank}"
    )
