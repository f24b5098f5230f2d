"""Trainable dense updates of chosen weights: `weight -> weight + delta`, delta in float32.

The update is registered as a parametrisation: the base tensor is never written, so removing the
parametrisation puts the untouched original back (bitwise), and the trained `delta` is the update
itself (no subtraction), kept in float32 even on bf16 models.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.utils import parametrize


class WeightShift(nn.Module):
    """Parametrisation weight -> weight + delta; `enabled = False` gives the base weight back
    (for reference forwards of the model before the edit)."""

    def __init__(
        self, like: torch.Tensor, benign: torch.Tensor | None = None, transposed: bool = False
    ):
        super().__init__()
        self.delta = nn.Parameter(torch.zeros(like.shape, dtype=torch.float32, device=like.device))
        self.enabled = True
        self.benign = benign  # [in, k]: input directions the update must not act on
        self.transposed = transposed  # the weight is stored [in, out] (GPT-2's Conv1D)

    def update(self) -> torch.Tensor:
        """The update the weight gets: `delta`, or `delta (I - U U^T)` with U = `benign` (its
        input side projected off the benign directions, never forming I - U U^T)."""
        if self.benign is None:
            return self.delta
        basis = self.benign
        if self.transposed:  # [in, out]
            return self.delta - basis @ (basis.T @ self.delta)
        return self.delta - (self.delta @ basis) @ basis.T

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.update().to(weight.dtype) if self.enabled else weight


@contextmanager
def weight_shifts(
    modules: Sequence[nn.Module],
    benign: Sequence[torch.Tensor | None] | None = None,
    transposed: bool = False,
) -> Iterator[list[WeightShift]]:
    """A zero-initialised shift on each module's `weight` (kept off the `benign` input
    directions, per module, when given), removed on exit whatever happens."""
    benign = benign or [None] * len(modules)
    shifts = [
        WeightShift(module.weight, basis, transposed)
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
