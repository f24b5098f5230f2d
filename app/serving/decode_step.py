"""One decoding step (a token per row) of a Llama-like model, layer by layer, without the
transformers forward's per-call machinery.

Why: a decoding step of the demo model on this 2-core CPU spent about 13 of its 30 ms outside its
matrix products (torch.profiler), much of it in what `model(...)` does on every call (output
recording, argument merging, building a 4-D mask, picking an attention function, wrapping
outputs), none of which a step of one token needs. With packed weights, one row decodes at 44.9
tokens/s this way against 36.5 through the forward (`bench/decode_step.py` (b)).

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
from transformers import DynamicCache

from app.serving.packed import GroupMemberForward

log = logging.getLogger(__name__)

DecodeStep = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, DynamicCache], torch.Tensor]

# Decoder layers whose forward is Llama's: norm, attention, residual, norm, MLP, residual; and
# MLPs whose forward is Llama's: down(act(gate(x)) * up(x)).
_LAYERS = {"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer"}
_MLPS = {"LlamaMLP", "MistralMLP", "Qwen2MLP"}


class LlamaLikeStep:
    """`step(ids [rows, 1], mask [rows, width], positions [rows, 1], cache)` → logits
    [rows, 1, vocab], the cache updated, as `model(...)` gives them."""

    def __init__(self, model: nn.Module):
        self.inner = model.model
        self.head = model.get_output_embeddings()
        self.layers = [_Layer.of(layer) for layer in self.inner.layers]

    @torch.inference_mode()
    def __call__(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        cache: DynamicCache,
    ) -> torch.Tensor:
        hidden = self.inner.embed_tokens(ids)
        cos, sin = (t.unsqueeze(1) for t in self.inner.rotary_emb(hidden, position_ids=positions))
        # transformers' mask for one new token: the padding mask, or none without padding.
        attend = None if bool(mask.all()) else mask.bool()[:, None, None, :]
        rows = ids.shape[0]
        for index, layer in enumerate(self.layers):
            residual = hidden
            hidden = layer.input_norm(hidden)
            heads = (rows, 1, -1, layer.head_dim)
            query, key, value = (p.view(heads).transpose(1, 2) for p in _project(layer.qkv, hidden))
            # The queries' and keys' rotation in one go: the same elementwise operations.
            turned = _rotate(torch.cat([query, key], dim=1), cos, sin)
            query, key = turned.split([query.shape[1], key.shape[1]], dim=1)
            key, value = cache.update(key, value, index)
            out = _attend(query, key, value, attend, layer.scaling)
            hidden = residual + layer.o_proj(out.reshape(rows, 1, -1))
            residual = hidden
            gate, up = _project(layer.gate_up, layer.post_norm(hidden))
            hidden = residual + layer.down_proj(layer.act(gate) * up)
        return self.head(self.inner.norm(hidden))


class _Layer(NamedTuple):
    """A decoder layer's parts, looked up once (`nn.Module` attribute lookups cost on every
    step)."""

    input_norm: nn.Module
    qkv: tuple[nn.Module, nn.Module, nn.Module]
    o_proj: nn.Module
    head_dim: int
    scaling: float
    post_norm: nn.Module
    gate_up: tuple[nn.Module, nn.Module]
    act: nn.Module
    down_proj: nn.Module

    @classmethod
    def of(cls, layer: nn.Module) -> _Layer:
        attention, mlp = layer.self_attn, layer.mlp
        return cls(
            layer.input_layernorm, (attention.q_proj, attention.k_proj, attention.v_proj),
            attention.o_proj, attention.head_dim, attention.scaling,
            layer.post_attention_layernorm, (mlp.gate_proj, mlp.up_proj), mlp.act_fn,
            mlp.down_proj,
        )  # fmt: skip


def _attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attend: torch.Tensor | None,
    scaling: float,
) -> torch.Tensor:
    """One new token's attention, [rows, 1, heads, dim], with its query heads grouped by the
    key/value head they share ([rows, kv heads, group, dim]): transformers' own layout for one
    token in a padded batch. Why for every batch: on the CPU, SDPA's `enable_gqa` (what
    transformers uses without padding) took 3x as long for one query: 56.9 against 19.0 µs a
    layer with 100 cached tokens on the demo model (`bench/decode_step.py` (c)). In bfloat16 the
    two layouts round differently, and neither is closer to float32 (the same bench, (d))."""
    rows, heads, _, dim = query.shape
    grouped = query.reshape(rows, key.shape[1], -1, dim)
    out = F.scaled_dot_product_attention(grouped, key, value, attn_mask=attend, scale=scaling)
    return out.reshape(rows, heads, 1, dim).transpose(1, 2)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding as Llama's `apply_rotary_pos_emb` applies it to one tensor."""
    half = x.shape[-1] // 2
    return (x * cos) + (torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin)


def _project(modules: tuple[nn.Module, ...], x: torch.Tensor) -> list[torch.Tensor]:
    """Each of `modules`' output for `x`: one product where they make up a packed group and none
    has hooks (the versions' delta hooks are registered on the modules they edit), else each
    module called."""
    forwards = [m.__dict__.get("forward") for m in modules]
    if all(isinstance(f, GroupMemberForward) for f in forwards):
        group = forwards[0].group
        hooked = any(m._forward_hooks or m._forward_pre_hooks for m in modules)
        if not hooked and group.modules == list(modules):
            return group.outputs(x)
    return [m(x) for m in modules]


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
    if not names <= _LAYERS or not mlps <= _MLPS:
        return f"its layers ({', '.join(sorted(names | mlps))}) are not Llama's"
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
