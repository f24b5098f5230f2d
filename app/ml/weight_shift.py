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

    def __init__(self, like: torch.Tensor):
        super().__init__()
        self.delta = nn.Parameter(torch.zeros(like.shape, dtype=torch.float32, device=like.device))
        self.enabled = True

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta.to(weight.dtype) if self.enabled else weight


@contextmanager
def weight_shifts(modules: Sequence[nn.Module]) -> Iterator[list[WeightShift]]:
    """A zero-initialised shift on each module's `weight`, removed on exit whatever happens."""
    shifts = [WeightShift(module.weight) for module in modules]
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
