"""Tensors derived from a model's weights, kept on disk beside the model cache, so that a new
process (a one-shot `detox dinm`, a restarted worker) does not rebuild them.

A file is named by a key that hashes the exact bytes of every weight the value depends on, with
everything else it was computed from: any change of those is another key, another file. A file is
trusted only if it reads as safetensors and carries its own key in its metadata; anything else
(a corrupt, truncated or foreign file) reads as absent and is rebuilt. Writes are atomic, and a
cache that cannot be written only costs the rebuild next time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save
from torch import nn

from app.ml.deltas import read_metadata

log = logging.getLogger(__name__)

FORMAT = "1"  # bump when what a key covers, or how a value is computed, changes


def content_key(model: nn.Module, exclude: list[nn.Module], **facts: Any) -> str:
    """sha256 of the exact bytes of every parameter outside the modules `exclude`, and `facts`."""
    skipped = {id(p) for module in exclude for p in module.parameters()}
    digest = hashlib.sha256(json.dumps({"format": FORMAT, **facts}, sort_keys=True).encode())
    for name, param in model.named_parameters():
        if id(param) in skipped:
            continue
        value = param.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tuple(value.shape)}:{value.dtype}".encode())
        digest.update(value.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_tensor(directory: Path, key: str) -> torch.Tensor | None:
    """The tensor kept under `key`, or None when there is none that can be trusted."""
    path = directory / f"{key}.safetensors"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("disk cache: cannot read %s: %s", path, exc)
        return None
    try:
        tensors = load(data)
        metadata = read_metadata(data)
    except (SafetensorError, ValueError, KeyError, struct.error) as exc:
        log.warning("disk cache: %s is unreadable (%s); rebuilding it", path, exc)
        return None
    if metadata.get("key") != key or set(tensors) != {"value"}:
        log.warning("disk cache: %s is not what its name says; rebuilding it", path)
        return None
    return tensors["value"]


def save_tensor(directory: Path, key: str, value: torch.Tensor) -> None:
    """Keep `value` under `key` (atomically); a failure is logged, never raised."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        data = save({"value": value.detach().to("cpu").contiguous()}, metadata={"key": key})
        with tempfile.NamedTemporaryFile(dir=directory, suffix=".tmp", delete=False) as tmp:
            tmp.write(data)
        os.replace(tmp.name, directory / f"{key}.safetensors")
    except OSError as exc:
        log.warning("disk cache: cannot write to %s: %s", directory, exc)
