"""bfloat16 linear layers on the CPU computed from weights pre-packed for oneDNN.

`F.linear` on a bfloat16 weight hands oneDNN the plain [out, in] matrix, which it reorders into its
blocked layout on every call. Reordering each weight once instead (what torch.compile's freezing
does) made the demo model's 210 decoder projections 1.4x faster at one row and 1.3x at 32 rows on
this CPU (README, "Batching and precision"), with the same tokens. The packed copy costs the
weights' memory once more, so `DETOX_SERVING_PACKED` can turn it off.

Sibling layers that a model feeds the same input (attention's q/k/v projections, the MLP's gate and
up projections) are packed as one matrix (`PackedGroup`): the first one called computes them all
and the others take their slice, so a decoding step of a Llama-like model runs 4 matrix products a
layer instead of 7, with the same logits. The 121 products of a step of the demo model at one row
took 13.1 ms against 14.9 ms for the 211 separate ones (`bench/decode_step.py` (a)): each oneDNN
call costs about 15 µs before it reads a weight.
Each layer's own forward hooks still run on its own slice.

Only the serving engine's model is packed: it runs without gradients and never changes a base
weight (versions are applied by hooks beside the layers). Should a weight change in place anyway,
it is packed again before its next use; with gradients on, a layer runs as before.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)


def _packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None):
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def _runs_plain(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a packed layer computes `x` from its plain weight: with gradients on (the packed
    copy has none), or for an input of another dtype or device than the weight's."""
    return torch.is_grad_enabled() or x.dtype != weight.dtype or x.device != weight.device


class PackedForward:
    """A `forward` for one nn.Linear, set on the module itself (its hooks still run)."""

    def __init__(self, module: nn.Linear):
        self.module = module
        self._packed = _pack(module.weight)
        self._version = module.weight._version

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.module.weight, self.module.bias
        if _runs_plain(x, weight):
            return F.linear(x, weight, bias)
        if weight._version != self._version:  # changed in place since it was packed
            self._packed, self._version = _pack(weight), weight._version
        return _packed_linear(x, self._packed, bias)


# Sibling layers that models call with one and the same input tensor.
_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class PackedGroup:
    """Sibling layers fed the same input, packed as one matrix: a call computes every member's
    output at once, and each member takes its own slice of it (`output`)."""

    def __init__(self, modules: list[nn.Linear]):
        self.modules = modules
        self.sizes = [m.out_features for m in modules]
        self._pack()
        self._input: torch.Tensor | None = None
        self._input_version = 0
        self._outputs: list[torch.Tensor | None] = []

    def _pack(self) -> None:
        self._versions = [m.weight._version for m in self.modules]
        self._packed = _pack(torch.cat([m.weight.detach() for m in self.modules]))
        biases = [m.bias for m in self.modules]
        self._bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])

    def output(self, member: int, x: torch.Tensor) -> torch.Tensor:
        """Member `member`'s output for `x`: a slice of the group's product, computed once for
        the members that share `x` (unchanged since, where `x` counts its versions)."""
        fresh = x is self._input and _version(x) == self._input_version
        if not fresh or self._outputs[member] is None:
            self._outputs = self.outputs(x)
            self._input, self._input_version = x, _version(x)
        out, self._outputs[member] = self._outputs[member], None
        if all(o is None for o in self._outputs):
            self._input = None  # every member took its slice: hold no activations
        return out

    def outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every member's output for `x`, from one product (the members' hooks not run)."""
        return list(self.product(x).split(self.sizes, dim=-1))

    def product(self, x: torch.Tensor) -> torch.Tensor:
        """The members' outputs for `x` side by side in the last dimension (hooks not run)."""
        if [m.weight._version for m in self.modules] != self._versions:
            self._pack()  # a weight changed in place since it was packed
        return _packed_linear(x, self._packed, self._bias)


def _version(t: torch.Tensor) -> int:
    """`t`'s version counter; 0 for an inference tensor, which keeps none."""
    return 0 if t.is_inference() else t._version


class GroupMemberForward:
    """The `forward` of one layer of a `PackedGroup`, set on the module itself."""

    def __init__(self, group: PackedGroup, member: int):
        self.group, self.member = group, member
        self.module = group.modules[member]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if _runs_plain(x, self.module.weight):
            return F.linear(x, self.module.weight, self.module.bias)
        return self.group.output(self.member, x)


def packing_works() -> bool:
    """Whether this torch build packs bfloat16 weights and computes with them as F.linear does."""
    ops = torch.ops.mkldnn
    if not (torch.backends.mkldnn.is_available() and hasattr(ops, "_linear_pointwise")):
        return False
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(24, 40, generator=generator).to(torch.bfloat16)
    x = torch.randn(3, 2, 40, generator=generator).to(torch.bfloat16)
    try:
        packed = _packed_linear(x, _pack(weight), None)
    except RuntimeError as exc:  # an op this build or CPU does not have
        log.info("bfloat16 weights are not packed: %s", exc)
        return False
    expected = F.linear(x, weight)
    return packed.shape == expected.shape and torch.allclose(packed, expected, rtol=1e-2, atol=1e-2)


def pack_linears(model: nn.Module) -> int:
    """Give every bfloat16 nn.Linear of `model` on the CPU a packed forward; how many got one
    (0 where this build cannot pack). Layers already packed are left as they are."""
    linears = [
        m for m in model.modules()
        if isinstance(m, nn.Linear) and m.weight.dtype == torch.bfloat16
        and m.weight.device.type == "cpu" and not _is_packed(m)
    ]  # fmt: skip
    if not linears or not packing_works():
        return 0
    grouped = set()
    for group in _sibling_groups(model, set(linears)):
        packed = PackedGroup(group)
        for member, module in enumerate(group):
            module.forward = GroupMemberForward(packed, member)
            grouped.add(module)
    for module in linears:
        if module not in grouped:
            module.forward = PackedForward(module)
    return len(linears)


def _sibling_groups(model: nn.Module, linears: set[nn.Module]) -> list[list[nn.Linear]]:
    """Groups of `_GROUPS` found whole under one parent, among `linears`, with one input size
    and each with a bias or none without."""
    groups = []
    for parent in model.modules():
        for names in _GROUPS:
            members = [getattr(parent, name, None) for name in names]
            if not all(m in linears for m in members):
                continue
            if (
                len({m.in_features for m in members}) == 1
                and len({m.bias is None for m in members}) == 1
            ):
                groups.append(members)
    return groups


def unpack_linears(model: nn.Module) -> None:
    """Give every packed layer its own forward back, and free the packed copies."""
    for module in model.modules():
        if isinstance(module, nn.Linear) and _is_packed(module):
            del module.forward


def _is_packed(module: nn.Linear) -> bool:
    return isinstance(module.forward, PackedForward | GroupMemberForward)
