"""Work that depends only on a model's weights, kept for the next edit of the same weights.

A worker edits one base (or one parent version) many times, and parts of every DINM edit are the
same each time: the recorded inputs of the benign and harmful retain groups, the null-space basis
of the benign inputs, the pre-edit distributions of the benign answers. A `WeightsCache` keeps
such values under a weights key: the identity and version counter of the parameters they depend
on, so any in-place change (a delta merged or reverted) or replacement of one of them gives a new
key. It holds one model (weakly: a new model at a recycled address never matches) and one key at
a time; a different one drops every value, so memory stays bounded by one base's worth.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

import torch
from torch import nn

T = TypeVar("T")


def weights_key(model: nn.Module, above: list[nn.Module] | None = None) -> tuple:
    """Identity and version counter of every parameter outside the modules `above` (the layers
    from the edited one up, whose inputs a recording holds but does not depend on). Take it before
    an edit registers its parametrisations: they add parameters of their own."""
    skip = {id(p) for module in above or [] for p in module.parameters()}
    return tuple((id(p), p._version) for p in model.parameters() if id(p) not in skip)


def ids_key(ids: torch.Tensor) -> tuple:
    """A hashable name for a tensor of token ids: its shape and values."""
    return (tuple(ids.shape), *ids.flatten().tolist())


class WeightsCache(Generic[T]):
    """Values by name for one (model, weights key) at a time."""

    def __init__(self) -> None:
        self._owner: weakref.ref | None = None
        self._key: tuple | None = None
        self.values: dict[Hashable, T] = {}

    def values_for(self, model: nn.Module, key: tuple) -> dict[Hashable, T]:
        """The values kept for these weights, to read and add to; emptied first if the model or
        the key differ from the last call's."""
        if self._owner is None or self._owner() is not model or self._key != key:
            self.values.clear()
            self._owner, self._key = weakref.ref(model), key
        return self.values

    def get(self, model: nn.Module, key: tuple, name: Hashable, compute: Callable[[], T]) -> T:
        """The value `name` for these weights, computed (and kept) on first use."""
        values = self.values_for(model, key)
        if name not in values:
            values[name] = compute()
        return values[name]
