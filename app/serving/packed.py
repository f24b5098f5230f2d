"""bfloat16 linear layers on the CPU computed from weights pre-packed for oneDNN.

`F.linear` on a bfloat16 weight hands oneDNN the plain [out, in] matrix, which it reorders into its
blocked layout on every call. Reordering each weight once instead (what torch.compile's freezing
does) made the demo model's 210 decoder projections 1.4x faster at one row and 1.3x at 32 rows on
this CPU (README, "Batching and precision"), with the same tokens. The packed copy costs the
weights' memory once more, so `DETOX_SERVING_PACKED` can turn it off.

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


class PackedForward:
    """A `forward` for one nn.Linear, set on the module itself (its hooks still run)."""

    def __init__(self, module: nn.Linear):
        self.module = module
        self._packed = _pack(module.weight)
        self._version = module.weight._version

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.module.weight, self.module.bias
        if torch.is_grad_enabled() or x.dtype != weight.dtype or x.device != weight.device:
            return F.linear(x, weight, bias)
        if weight._version != self._version:  # changed in place since it was packed
            self._packed, self._version = _pack(weight), weight._version
        return _packed_linear(x, self._packed, bias)


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
        and m.weight.device.type == "cpu" and not isinstance(m.forward, PackedForward)
    ]  # fmt: skip
    if not linears or not packing_works():
        return 0
    for module in linears:
        module.forward = PackedForward(module)
    return len(linears)


def unpack_linears(model: nn.Module) -> None:
    """Give every packed layer its own forward back, and free the packed copies."""
    for module in model.modules():
        if isinstance(module, nn.Linear) and isinstance(module.forward, PackedForward):
            del module.forward
