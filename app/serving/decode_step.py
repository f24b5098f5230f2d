"""One decoding step (a token per row) of a Llama-like model, layer by layer, without the
transformers forward's per-call machinery.

Why: a decoding step of the demo model on this 2-core CPU spent about 13 of its 30 ms outside its
matrix products (torch.profiler), much of it in what `model(...)` does on every call (output
recording, argument merging, building a 4-D mask, picking an attention function, wrapping
outputs), none of which a step of one token needs. With packed weights, one row decodes at 44.9
tokens/s this way against 36.5 through the forward (`bench/decode_step.py` (b)).

Each torch operation called from Python costs 1-3 µs here whatever its size, so the step also
keeps their number down: queries and keys rotate together straight from the q/k/v product, the
rotation rolls instead of slicing and concatenating, RMSNorm is torch's `rms_norm` where that
gives the same bits, and a module with no hooks is run without `nn.Module.__call__`: 1,688
operations a step of the demo model instead of 2,138: 3-10% more tokens/s at one row and 4-15%
at 8 rows, in interleaved runs against the previous step on a machine shared with other work.

`LlamaLikeStep` calls the model's own modules in the model's order, so the versions' delta hooks
still run (they sit on the linear modules). Two things differ. Grouped projections (q/k/v,
gate/up; see `packed`) run as one product, which gives the same numbers. Attention always takes
the layout transformers itself takes for one token in a padded batch (`_attend` says why), which
in bfloat16 rounds differently from transformers' layout without padding: the logits are the
model's own for a padded batch, and within rounding of them without padding.

It serves decoder stacks shaped like Llama's (Llama, Mistral and Qwen2 without sliding windows)
with plain SDPA attention; `decode_step` says None for anything else, and the cohort then calls the
model as before. Nothing is assumed unchecked: `decode_step` runs a probe step both ways (two rows,
one padded) and keeps the lean one only when the logits agree.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module
from transformers import DynamicCache

from app.serving.packed import GroupMemberForward, PackedGroup

log = logging.getLogger(__name__)

# Hooks registered for every module (`register_module_forward_hook`): torch keeps them in private
# dicts, which `nn.Module.__call__` reads; none if a torch release renames them.
_GLOBAL_HOOKS = (
    getattr(_module, "_global_forward_hooks", {}),
    getattr(_module, "_global_forward_pre_hooks", {}),
)

DecodeStep = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, DynamicCache], torch.Tensor]

# Decoder layers whose forward is Llama's: norm, attention, residual, norm, MLP, residual; MLPs
# whose forward is Llama's: down(act(gate(x)) * up(x)); and Llama's RMSNorm.
_LAYERS = {"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer"}
_MLPS = {"LlamaMLP", "MistralMLP", "Qwen2MLP"}
_NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm"}


class LlamaLikeStep:
    """`step(ids [rows, 1], mask [rows, width], positions [rows, 1], cache)` → logits
    [rows, 1, vocab], the cache updated, as `model(...)` gives them."""

    def __init__(self, model: nn.Module):
        self.inner = model.model
        self.head = model.get_output_embeddings()
        fused = _fused_norm_is_exact(self.inner.norm.weight)
        self.layers = [_Layer.of(layer, fused) for layer in self.inner.layers]
        self.norm = _Norm.of(self.inner.norm, fused)

    @torch.inference_mode()
    def __call__(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        cache: DynamicCache,
    ) -> torch.Tensor:
        hidden = _run(self.inner.embed_tokens, ids)
        cos, sin = _rotation(*self.inner.rotary_emb(hidden, position_ids=positions))
        # transformers' mask for one new token: the padding mask, or none without padding.
        attend = None if bool(mask.all()) else mask.bool()[:, None, None, :]
        for index, layer in enumerate(self.layers):
            query, key, value = _attention_inputs(layer, _norm(layer.input_norm, hidden), cos, sin)
            key, value = cache.update(key, value, index)
            out = _attend(query, key, value, attend, layer.scaling)
            hidden = hidden + _run(layer.o_proj, out)
            gate, up = _outputs(layer.gate_up, _norm(layer.post_norm, hidden))
            hidden = hidden + _run(layer.down_proj, _run(layer.act, gate) * up)
        return _run(self.head, _norm(self.norm, hidden))


class _Norm(NamedTuple):
    """An RMSNorm layer and its parts; `fused`: compute it with torch's `rms_norm` (`_norm`)."""

    module: nn.Module
    weight: torch.Tensor
    eps: float
    shape: tuple[int, ...]
    fused: bool

    @classmethod
    def of(cls, module: nn.Module, fused: bool) -> _Norm:
        weight = module.weight
        return cls(module, weight, module.variance_epsilon, tuple(weight.shape), fused)


class _Layer(NamedTuple):
    """A decoder layer's parts, looked up once (`nn.Module` attribute lookups cost on every
    step)."""

    input_norm: _Norm
    qkv: tuple[nn.Module, nn.Module, nn.Module]
    heads: int
    head_dim: int
    o_proj: nn.Module
    scaling: float
    post_norm: _Norm
    gate_up: tuple[nn.Module, nn.Module]
    act: nn.Module
    down_proj: nn.Module

    @classmethod
    def of(cls, layer: nn.Module, fused_norm: bool) -> _Layer:
        attention, mlp = layer.self_attn, layer.mlp
        dim = attention.head_dim
        return cls(
            _Norm.of(layer.input_layernorm, fused_norm),
            (attention.q_proj, attention.k_proj, attention.v_proj),
            attention.q_proj.out_features // dim, dim, attention.o_proj, attention.scaling,
            _Norm.of(layer.post_attention_layernorm, fused_norm), (mlp.gate_proj, mlp.up_proj),
            mlp.act_fn, mlp.down_proj,
        )  # fmt: skip


def _attention_inputs(
    layer: _Layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The queries and keys, rotated, and the values of one token per row: [rows, heads, 1,
    dim]. Queries and keys rotate together: with q/k/v packed as one matrix they lie side by
    side in its product already."""
    rows, dim = x.shape[0], layer.head_dim
    group = _group(layer.qkv)
    whole = None if group is None else group.product(x)
    if whole is None:
        query, key, value = (_run(m, x) for m in layer.qkv)
        turning = torch.cat([query, key], dim=-1)
    else:
        turning, value = whole.split([whole.shape[-1] - layer.qkv[2].out_features,
                                      layer.qkv[2].out_features], dim=-1)  # fmt: skip
    turned = _rotate(turning.view(rows, 1, -1, dim), cos, sin).transpose(1, 2)
    query, key = turned.split([layer.heads, turned.shape[1] - layer.heads], dim=1)
    return query, key, value.view(rows, 1, -1, dim).transpose(1, 2)


def _attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attend: torch.Tensor | None,
    scaling: float,
) -> torch.Tensor:
    """One new token's attention, [rows, 1, heads × dim], with its query heads grouped by the
    key/value head they share ([rows, kv heads, group, dim]): transformers' own layout for one
    token in a padded batch. Why for every batch: on the CPU, SDPA's `enable_gqa` (what
    transformers uses without padding) took 3x as long for one query: 56.9 against 19.0 µs a
    layer with 100 cached tokens on the demo model (`bench/decode_step.py` (c)). In bfloat16 the
    two layouts round differently, and neither is closer to float32 (the same bench, (d))."""
    rows, heads, _, dim = query.shape
    grouped = query.reshape(rows, key.shape[1], -1, dim)
    out = F.scaled_dot_product_attention(grouped, key, value, attn_mask=attend, scale=scaling)
    return out.reshape(rows, 1, heads * dim)  # heads in order: a key/value head's group after group


def _rotation(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotary embedding's cos and sin [rows, 1, dim] laid out for `_rotate`: over the heads of
    [rows, 1, heads, dim], the sine's first half negated."""
    half = sin.shape[-1] // 2
    signed = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
    return cos.unsqueeze(2), signed.unsqueeze(2)


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Llama's `apply_rotary_pos_emb` for one tensor, x·cos + rotate_half(x)·sin, with the
    same roundings: rotate_half(x) = (-x₂, x₁) and (-x₂)·s = x₂·(-s) exactly, so rolling x by
    half its width and taking the signed sine gives each element's product as Llama does, in
    two operations instead of five."""
    return (x * cos) + (x.roll(x.shape[-1] // 2, dims=-1) * signed_sin)


def _norm(norm: _Norm, x: torch.Tensor) -> torch.Tensor:
    """Llama's RMSNorm in 2 operations instead of 8, where torch's `rms_norm` (which computes in
    float32 too) gives the same numbers (`_fused_norm_is_exact`): 17 against 23 µs on this CPU."""
    if not norm.fused or _hooked(norm.module):
        return norm.module(x)
    return norm.weight * F.rms_norm(x, norm.shape, eps=norm.eps)


def _fused_norm_is_exact(weight: torch.Tensor) -> bool:
    """Whether `F.rms_norm` gives what Llama's RMSNorm computes step by step, bit for bit, for
    inputs of `weight`'s dtype and device (on the CPU it takes the same steps; a kernel of
    another device may round otherwise)."""
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(64, 1, 96, generator=generator) * 3).to(weight.device, weight.dtype)
    eps = 1e-6
    wide = x.to(torch.float32)
    stepwise = (wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return torch.equal(F.rms_norm(x, (96,), eps=eps), stepwise)


def _outputs(modules: tuple[nn.Module, ...], x: torch.Tensor) -> list[torch.Tensor]:
    """Each of `modules`' output for `x`: from one product where they make up a packed group
    and none has hooks, else each module run."""
    group = _group(modules)
    return [_run(m, x) for m in modules] if group is None else group.outputs(x)


def _group(modules: tuple[nn.Module, ...]) -> PackedGroup | None:
    """The packed group `modules` make up, to run as one product; None where they are not one
    group (see `packed`) or one has hooks (the versions' delta hooks are registered on the
    modules they edit)."""
    forwards = [m.__dict__.get("forward") for m in modules]
    if not all(isinstance(f, GroupMemberForward) for f in forwards):
        return None
    group = forwards[0].group
    if group.modules != list(modules) or any(_hooked(m) for m in modules):
        return None
    return group


def _run(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`module(x)`, without nn.Module's call machinery where no hook would run."""
    return module(x) if _hooked(module) else module.forward(x)


def _hooked(module: nn.Module) -> bool:
    return bool(
        module._forward_hooks or module._forward_pre_hooks
        or _GLOBAL_HOOKS[0] or _GLOBAL_HOOKS[1]
    )  # fmt: skip


def model_step(model: nn.Module) -> DecodeStep:
    """The step through the model's own forward: what the cohort runs without a lean one."""

    def step(ids, mask, positions, cache):
        return model(input_ids=ids, attention_mask=mask, position_ids=positions,
                     past_key_values=cache, use_cache=True).logits  # fmt: skip

    return step


def decode_step(model: nn.Module) -> DecodeStep | None:
    """A lean step for `model` when it has a Llama-like shape and the probe agrees, else None."""
    why = _unsupported(model)
    if why is None:
        step = LlamaLikeStep(model)
        why = _disagreement(model, step)
        if why is None:
            return step
    log.info("decoding steps call the model's own forward: %s", why)
    return None


def _unsupported(model: nn.Module) -> str | None:
    config = model.config
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if inner is None or not layers or model.get_output_embeddings() is None:
        return f"{type(model).__name__} is not a decoder stack shaped like Llama's"
    names = {type(layer).__name__ for layer in layers}
    mlps = {type(layer.mlp).__name__ for layer in layers}
    norms = {type(n).__name__ for n in inner.modules() if "Norm" in type(n).__name__}
    if not names <= _LAYERS or not mlps <= _MLPS or not norms <= _NORMS:
        return f"its layers ({', '.join(sorted(names | mlps | norms))}) are not Llama's"
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return f"its attention is {config._attn_implementation!r}, not 'sdpa'"
    windows = [getattr(layer.self_attn, "sliding_window", None) for layer in layers]
    types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if any(windows) or types != {"full_attention"}:
        return "some of its layers attend through a sliding window"
    return None


def _disagreement(model: nn.Module, step: LlamaLikeStep) -> str | None:
    """Why a probe step (two rows, one left padded) gives other logits than `model(...)`, or
    None when they agree."""
    device = model.get_output_embeddings().weight.device
    vocab = model.get_output_embeddings().weight.shape[0]
    ids = torch.tensor([[0, 5, 9, 7], [3, 1, 4, 1]], device=device) % vocab
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]], device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    new, new_positions = ids[:, -1:].flip(0), positions[:, -1:] + 1
    new_mask = torch.cat([mask, mask.new_ones((2, 1))], dim=1)

    def prefilled() -> DynamicCache:
        cache = DynamicCache()
        model_step(model)(ids, mask, positions, cache)
        return cache

    with torch.inference_mode():
        expected = model_step(model)(new, new_mask, new_positions, prefilled()).float()
        got = step(new, new_mask, new_positions, prefilled()).float()
    if expected.shape != got.shape:
        return f"a probe step gave logits of shape {tuple(got.shape)}, not {tuple(expected.shape)}"
    if not torch.allclose(expected, got, rtol=1e-3, atol=1e-3):
        gap = float((expected - got).abs().max())
        return f"a probe step's logits differ from the model's by up to {gap:.3g}"
    return None
