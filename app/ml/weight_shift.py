"""Trainable updates of chosen weights: `weight -> weight + update`, the update in float32.

The update is registered as a parametrisation: the base tensor is never written, so removing the
parametrisation puts the untouched original back (bitwise), and the trained update is the update
itself (no subtraction), kept in float32 even on bf16 models.

An update is either dense (`delta`, the weight's own shape) or, with a `rank`, the product of two
factors, `scale · B @ A` (A: [rank, in], random; B: [out, rank], zero, so training starts from
the base model), which is stored exactly as a low-rank delta. A rank is at most the weight's full
rank: a larger one (a preset's, on a small model) is cut to it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.utils import parametrize

from app.ml.deltas import DenseUpdate, LowRankUpdate, Update

# A's entries are drawn from a generator seeded with this, shift by shift: an edit is repeatable.
_FACTOR_SEED = 0


def full_rank(weight: torch.Tensor) -> int:
    """The most rank an update of `weight` can have."""
    return min(weight.shape)


def rank_warnings(weight: torch.Tensor, rank: int | None) -> list[str]:
    """What a job should be told when `rank` is cut to the full rank of `weight`."""
    full = full_rank(weight)
    if rank is None or rank <= full:
        return []
    shape = "x".join(map(str, weight.shape))
    return [
        f"rank {rank} is above {full}, the full rank of the edited {shape} projections: they "
        f"were tuned at rank {full}"
    ]


class WeightShift(nn.Module):
    """Parametrisation weight -> weight + update; `enabled = False` gives the base weight back
    (for reference forwards of the model before the edit)."""

    def __init__(
        self,
        like: torch.Tensor,
        benign: torch.Tensor | None = None,
        transposed: bool = False,
        rank: int | None = None,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        self.enabled = True
        self.benign = benign  # [in, k]: input directions the update must not act on
        self.transposed = transposed  # the weight is stored [in, out] (GPT-2's Conv1D)
        self.rank = rank = None if rank is None else min(rank, full_rank(like))
        if rank is None:
            self.delta = nn.Parameter(torch.zeros(like.shape, device=like.device))
            return
        in_features = like.shape[0] if transposed else like.shape[1]
        out_features = like.shape[1] if transposed else like.shape[0]
        # A as nn.Linear initialises a weight (entries of standard deviation 1/sqrt(3 in)), B
        # zero. An Adam step moves B's entries by about lr, so each entry of B @ A by about
        # lr * sqrt(rank / (3 in)); the scale undoes that, and a preset's lr moves a low-rank
        # update about as fast as a dense one.
        bound = 1.0 / math.sqrt(in_features)
        a = torch.rand(rank, in_features, generator=generator, dtype=torch.float32)
        self.lora_a = nn.Parameter(((2 * a - 1) * bound).to(like.device))
        self.lora_b = nn.Parameter(torch.zeros(out_features, rank, device=like.device))
        self.scale = math.sqrt(3 * in_features / rank)

    def trainable(self) -> list[nn.Parameter]:
        return [self.delta] if self.rank is None else [self.lora_a, self.lora_b]

    def _projected(self, a: torch.Tensor) -> torch.Tensor:
        """`a` [.., in] off the benign input directions: a (I - U U^T), never forming I - U U^T."""
        return a if self.benign is None else a - (a @ self.benign) @ self.benign.T

    def update(self) -> torch.Tensor:
        """The update the weight gets, in the weight's own layout."""
        if self.rank is not None:
            b, a = self.factors()
            return b @ a
        if self.benign is None:
            return self.delta
        if self.transposed:  # [in, out]
            return self.delta - self.benign @ (self.benign.T @ self.delta)
        return self._projected(self.delta)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(b, a) with update = b @ a in the weight's own layout (low-rank shifts only)."""
        a = self._projected(self.lora_a)  # [rank, in]
        b = self.lora_b * self.scale  # [out, rank]
        return (a.T, b.T) if self.transposed else (b, a)

    def to_update(self, dtype: torch.dtype) -> Update:
        """The trained update as a delta's update: exact low-rank factors, or dense."""
        with torch.no_grad():
            if self.rank is None:
                return DenseUpdate(self.update().detach().to(dtype))
            b, a = self.factors()
            return LowRankUpdate(a=a.to(dtype).contiguous(), b=b.to(dtype).contiguous())

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.update().to(weight.dtype) if self.enabled else weight


@contextmanager
def weight_shifts(
    modules: Sequence[nn.Module],
    benign: Sequence[torch.Tensor | None] | None = None,
    transposed: bool = False,
    rank: int | None = None,
) -> Iterator[list[WeightShift]]:
    """A zero-initialised shift on each module's `weight` (kept off the `benign` input
    directions, per module, when given; of the given `rank`, else dense), removed on exit
    whatever happens."""
    benign = benign or [None] * len(modules)
    generator = torch.Generator().manual_seed(_FACTOR_SEED)
    shifts = [
        WeightShift(module.weight, basis, transposed, rank, generator)
        for module, basis in zip(modules, benign, strict=True)
    ]
    try:
        for module, shift in zip(modules, shifts, strict=True):
            parametrize.register_parametrization(module, "weight", shift, unsafe=True)
        yield shifts
    finally:
        for module in modules:
            if parametrize.is_parametrized(module, "weight"):
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)


@contextmanager
def shifts_disabled(shifts: Sequence[WeightShift]) -> Iterator[None]:
    for shift in shifts:
        shift.enabled = False
    try:
        yield
    finally:
        for shift in shifts:
            shift.enabled = True
