"""Weight deltas: what an edit changed, kept apart from the base weights.

A `Delta` maps full parameter names to updates in the parameter's own storage layout (so GPT-2's
transposed Conv1D weights need no special case): `DenseUpdate` holds the difference itself,
`LowRankUpdate` holds factors with difference = B @ A. Deltas of a version chain compose by
addition. Applying records the original values and reverting copies them back, so a revert is
bitwise exact rather than a subtraction that rounds.

Serialised form: safetensors bytes (never pickle) whose metadata carries the encodings, dtype and
the base fingerprint; the sha256 of those bytes is checked on every load.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from app.ml.errors import ChecksumMismatchError, DeltaError, FingerprintMismatchError

FORMAT = "detox.delta/1"
# Config keys that say how a model was loaded rather than what it is.
_VOLATILE_CONFIG_KEYS = {
    "dtype", "torch_dtype", "transformers_version", "use_cache", "quantization_config",
    "name_or_path", "pad_token_id", "output_attentions", "output_hidden_states",
}  # fmt: skip


@dataclass(frozen=True)
class DenseUpdate:
    value: torch.Tensor
    encoding = "dense"

    def dense(self) -> torch.Tensor:
        return self.value

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.value.shape)

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {name: self.value}


@dataclass(frozen=True)
class LowRankUpdate:
    a: torch.Tensor  # [rank, in]
    b: torch.Tensor  # [out, rank]
    encoding = "lowrank"

    def dense(self) -> torch.Tensor:
        return self.b.float() @ self.a.float()

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.b.shape[0], self.a.shape[1])

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {f"{name}::A": self.a, f"{name}::B": self.b}


Update = DenseUpdate | LowRankUpdate


def _add(x: Update, y: Update) -> Update:
    if isinstance(x, LowRankUpdate) and isinstance(y, LowRankUpdate):
        # Stacking the factors is exact: [B1 B2] @ [A1; A2] = B1 A1 + B2 A2.
        return LowRankUpdate(a=torch.cat([x.a, y.a]), b=torch.cat([x.b, y.b], dim=1))
    return DenseUpdate((x.dense().float() + y.dense().float()).to(x.dense().dtype))


@dataclass(frozen=True)
class Delta:
    updates: dict[str, Update]
    base_fingerprint: str | None = None
    meta: dict[str, str] = field(default_factory=dict)

    @property
    def params(self) -> list[str]:
        return sorted(self.updates)

    @property
    def encoding(self) -> str:
        kinds = {u.encoding for u in self.updates.values()}
        return kinds.pop() if len(kinds) == 1 else "mixed"

    @property
    def dtype(self) -> str:
        first = next(iter(self.updates.values()), None)
        tensor = first.dense() if isinstance(first, DenseUpdate) else first.a if first else None
        return str(tensor.dtype).removeprefix("torch.") if tensor is not None else "float32"

    def __add__(self, other: Delta) -> Delta:
        merged = dict(self.updates)
        for name, update in other.updates.items():
            merged[name] = _add(merged[name], update) if name in merged else update
        same_base = self.base_fingerprint == other.base_fingerprint
        return Delta(merged, self.base_fingerprint if same_base else None, dict(self.meta))

    def to_bytes(self) -> bytes:
        tensors: dict[str, torch.Tensor] = {}
        for name in self.params:
            for key, tensor in self.updates[name].tensors(name).items():
                tensors[key] = tensor.detach().contiguous().cpu()
        metadata = {
            **self.meta,
            "format": FORMAT,
            "encodings": json.dumps({n: self.updates[n].encoding for n in self.params}),
            "dtype": self.dtype,
            "base_fingerprint": self.base_fingerprint or "",
        }
        return st_save(tensors, metadata=metadata)

    @classmethod
    def from_bytes(cls, data: bytes, *, sha256: str | None = None) -> Delta:
        """Parse serialised bytes; with `sha256`, refuse bytes that do not hash to it."""
        if sha256 is not None and checksum(data) != sha256:
            raise ChecksumMismatchError(
                f"delta checksum mismatch: the bytes hash to {checksum(data)[:16]}..., "
                f"expected {sha256[:16]}... (corrupt or altered delta)"
            )
        try:
            metadata = read_metadata(data)
            tensors = st_load(data)
            encodings = json.loads(metadata.pop("encodings"))
        except (ValueError, KeyError, struct.error) as exc:
            raise DeltaError(f"not a detox delta: {exc}") from None
        if metadata.pop("format", None) != FORMAT:
            raise DeltaError(f"not a detox delta (format is not {FORMAT})")
        metadata.pop("dtype", None)
        fingerprint = metadata.pop("base_fingerprint", "") or None
        updates: dict[str, Update] = {}
        for name, encoding in encodings.items():
            if encoding == "dense":
                updates[name] = DenseUpdate(tensors[name])
            else:
                updates[name] = LowRankUpdate(a=tensors[f"{name}::A"], b=tensors[f"{name}::B"])
        return cls(updates, fingerprint, metadata)


def adapter_rank(chain: Iterable[Delta]) -> int:
    """The rank of the LoRA adapter that holds the chain's sum exactly: per parameter, the
    stacked ranks of its low-rank updates, or its full rank once any update is dense; the
    largest over the parameters (0 for no update)."""
    total = sum(chain, Delta({}))
    ranks = [
        update.a.shape[0] if isinstance(update, LowRankUpdate) else min(update.shape)
        for update in total.updates.values()
    ]
    return max(ranks, default=0)


def checksum(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of safetensors bytes (their header is 8 bytes of length, then JSON)."""
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    return dict(header.get("__metadata__") or {})


def fingerprint(model: nn.Module, names: Iterable[str]) -> str:
    """Hash of the model's config and of the current values of the named parameters.

    Values are rounded to bfloat16 before hashing, so one checkpoint loaded in float32 on a CPU and
    in bfloat16 on a GPU has the same fingerprint, and a delta made on one applies on the other.
    """
    config = {
        k: v
        for k, v in model.config.to_dict().items()
        if k not in _VOLATILE_CONFIG_KEYS and not k.startswith("_")
    }
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    params = dict(model.named_parameters())
    for name in sorted(set(names)):
        if name not in params:
            raise DeltaError(f"the model has no parameter {name!r}")
        value = params[name].detach().to(device="cpu", dtype=torch.bfloat16).contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(value.shape)).encode())
        digest.update(value.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()


class AppliedDeltas:
    """Deltas merged into a model's weights, with the originals kept for an exact revert."""

    def __init__(self, model: nn.Module, originals: dict[str, torch.Tensor]):
        self._model = model
        self._originals = originals

    @property
    def params(self) -> list[str]:
        return sorted(self._originals)

    def original(self, name: str) -> torch.Tensor:
        return self._originals[name]

    def revert(self) -> None:
        params = dict(self._model.named_parameters())
        with torch.no_grad():
            for name, value in self._originals.items():
                params[name].copy_(value)
        self._originals = {}


def apply_deltas(
    model: nn.Module, deltas: list[Delta], *, check_fingerprint: bool = True
) -> AppliedDeltas:
    """Merge a chain of deltas (base first) into `model`; every fingerprint is checked first."""
    check_deltas(model, deltas, check_fingerprint=check_fingerprint)
    params = dict(model.named_parameters())
    total = sum(deltas[1:], deltas[0]) if deltas else Delta({})
    originals: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            for name, update in total.updates.items():
                param = params[name]
                merged = param.float() + update.dense().to(param.device, torch.float32)
                if not torch.isfinite(merged).all():
                    raise DeltaError(f"applying the delta makes {name} non-finite")
                originals[name] = param.detach().clone()
                param.copy_(merged.to(param.dtype))
    except BaseException:
        AppliedDeltas(model, originals).revert()
        raise
    return AppliedDeltas(model, originals)


@contextmanager
def applied(model: nn.Module, deltas: list[Delta], **kwargs: bool) -> Iterator[AppliedDeltas]:
    handle = apply_deltas(model, deltas, **kwargs)
    try:
        yield handle
    finally:
        handle.revert()


def check_deltas(
    model: nn.Module, deltas: Iterable[Delta], *, check_fingerprint: bool = True
) -> None:
    """Refuse (DeltaError) deltas that do not fit `model`: a parameter it lacks, another shape, or
    (FingerprintMismatchError) a base fingerprint that is not that of the model's values."""
    params = dict(model.named_parameters())
    for delta in deltas:
        _check_compatible(model, params, delta, check_fingerprint)


def _check_compatible(
    model: nn.Module, params: dict[str, nn.Parameter], delta: Delta, check_fingerprint: bool
) -> None:
    for name, update in delta.updates.items():
        if name not in params:
            raise DeltaError(f"delta edits {name!r}, which this model does not have")
        if tuple(params[name].shape) != update.shape:
            raise DeltaError(
                f"delta for {name!r} has shape {update.shape}, the model's is "
                f"{tuple(params[name].shape)}"
            )
    if check_fingerprint and delta.base_fingerprint:
        actual = fingerprint(model, delta.updates)
        if actual != delta.base_fingerprint:
            made_for = delta.meta.get("model", "another model")
            raise FingerprintMismatchError(
                f"delta was made for a different base model ({made_for}; fingerprint "
                f"{delta.base_fingerprint[:12]}), the loaded base's is {actual[:12]}"
            )
