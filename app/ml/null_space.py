"""Keep a DINM update away from what benign requests use: a projection of the update onto the
directions that the benign retain set's inputs to the edited projection leave (nearly) empty.

For a weight `W` of a linear map `y = W x`, an update `D` changes the output by `D x`. Let `X`
hold the inputs `x` that the edited projection receives at the positions predicting the answers of
the packaged benign retain set (`app/ml/data/benign_retain.json`). With `U` the top eigenvectors
of `X^T X` that carry the share `energy` of its trace, the update is used as `D (I - U U^T)`: it
moves nothing along the directions benign answers live in (in the spirit of AlphaEdit's null-space
constraint, Fang et al. 2024), so the edit is left to the directions where the harmful request
differs. The basis depends only on the weights and the layer, so it is computed once per
weights key and reused by later edits.
"""

from __future__ import annotations

import torch
from torch import nn

from app.ml.disk_cache import content_key, load_tensor, save_tensor
from app.ml.models import LoadedModel
from app.ml.prompts import PromptAnswer, right_padded
from app.ml.runners import run_layers
from app.ml.weights_cache import WeightsCache, ids_key, weights_key

# Bases by (layer, energy, device, prompts).
_BASES: WeightsCache[torch.Tensor] = WeightsCache()


# Pairs per forward pass while collecting the inputs: one pass per pair reads every weight once a
# pair, which on a CPU costs more than the arithmetic of a short prompt.
INPUT_BATCH = 16


def benign_inputs(
    lm: LoadedModel, module: nn.Module, pairs: list[PromptAnswer]
) -> list[torch.Tensor]:
    """Per pair, [n, d_in] inputs of `module` at the positions that predict its answer tokens.

    Pairs go through the model in right-padded batches (token 0, valid in every vocabulary); each
    row's inputs are those of the pair alone."""
    # Batched by length, so little is padded; the rows come back in the pairs' order.
    order = sorted(range(len(pairs)), key=lambda i: pairs[i].input_ids.shape[1])
    rows: dict[int, torch.Tensor] = {}
    for first in range(0, len(order), INPUT_BATCH):
        batch = order[first : first + INPUT_BATCH]
        ids = right_padded([pairs[i].input_ids[0] for i in batch], pad_id=0)
        inputs = _module_inputs(lm, module, ids)
        for r, i in enumerate(batch):
            start, end = max(pairs[i].answer_start - 1, 0), pairs[i].input_ids.shape[1] - 1
            rows[i] = inputs[r, start:end].double()
    return [rows[i] for i in range(len(pairs))]


def _module_inputs(lm: LoadedModel, module: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """[B, T, d_in]: what `module` receives when the model runs on `ids` [B, T]."""
    seen: list[torch.Tensor] = []

    def keep(_module: nn.Module, args: tuple) -> None:
        seen.append(args[0].detach())  # [B, T, d_in], or [B * T, d_in] (OPT flattens the batch)

    hook = module.register_forward_pre_hook(keep)
    try:
        run_layers(lm.model, ids.to(lm.device))
    finally:
        hook.remove()
    return seen[0].reshape(*ids.shape, -1)


def benign_basis(rows: list[torch.Tensor], energy: float) -> torch.Tensor:
    """U [d_in, k]: the fewest top eigenvectors of the inputs' second-moment matrix holding
    `energy` of its trace (the projector is I - U U^T). The positions that predict a first
    answer token (where a refusal starts) weigh as much together as all answer positions together.

    Computed as the right singular vectors of the stacked, scaled rows, so nothing of size
    d_in x d_in is formed (14336 wide on a 7B model's MLP down projection)."""
    rows = [row for row in rows if row.shape[0]]  # a pair cut to fit a short context
    if not rows:
        raise ValueError("no benign answer positions to project off")
    first = torch.stack([row[0] for row in rows])
    every = torch.cat(rows)
    scaled = torch.cat([first / first.shape[0] ** 0.5, every / every.shape[0] ** 0.5])
    _, singular, vh = torch.linalg.svd(scaled, full_matrices=False)  # descending
    values = singular.square()
    share = values.cumsum(0) / values.sum()
    target = torch.tensor(energy, dtype=share.dtype, device=share.device)
    k = int(torch.searchsorted(share, target).item()) + 1
    return vh[: min(k, vh.shape[0])].T


def benign_directions(
    lm: LoadedModel, layer: int, pairs: list[PromptAnswer], energy: float
) -> torch.Tensor:
    """`benign_basis` for `layer`'s MLP output projection, float32 on the model's device.

    Cached under the weights its inputs depend on: everything but that projection and the layers
    above it (so an edit of them, applied and reverted, keeps the cache)."""
    module = lm.adapter.mlp_out(layer)
    independent = [module, *list(lm.adapter.layers)[layer + 1 :]]
    key = weights_key(lm.model, independent)
    prompts = tuple(ids_key(pair.input_ids) for pair in pairs)

    def compute() -> torch.Tensor:
        disk_key = None
        if lm.cache_dir is not None:
            facts = {"value": "benign-basis", "layer": layer, "energy": energy, "prompts": prompts,
                     "device": lm.device.type, "dtype": str(lm.dtype)}  # fmt: skip
            disk_key = content_key(lm.model, independent, **facts)
            kept = load_tensor(lm.cache_dir, disk_key)
            if kept is not None and _fits(kept, lm, module):
                return kept.to(lm.device)
        basis = benign_basis(benign_inputs(lm, module, pairs), energy).float()
        if disk_key is not None:
            save_tensor(lm.cache_dir, disk_key, basis)
        return basis.to(lm.device)

    return _BASES.get(lm.model, key, (layer, energy, str(lm.device), hash(prompts)), compute)


def _fits(basis: torch.Tensor, lm: LoadedModel, module: nn.Module) -> bool:
    """Whether a kept basis can be one of `module`'s: [d_in, k], finite, float32."""
    weight = module.weight
    d_in = weight.shape[0] if lm.adapter.spec.transposed else weight.shape[1]
    return (
        basis.dtype == torch.float32
        and basis.ndim == 2
        and basis.shape[0] == d_in
        and 0 < basis.shape[1] <= d_in
        and bool(torch.isfinite(basis).all())
    )
