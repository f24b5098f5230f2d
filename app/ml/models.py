"""Loading causal LMs: the demo model, a local folder, a hub id, or a GGUF file.

Device and dtype follow the hardware unless told otherwise: CUDA with bfloat16 when a GPU is
present, CPU with float32 otherwise. Every loaded model is put in eval mode with gradients off;
editing code turns gradients on for exactly the parameter it tunes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from app.ml.arch import ModelAdapter
from app.ml.deltas import fingerprint
from app.ml.demo import default_cache_dir, demo_model_dir
from app.ml.errors import InputError
from app.ml.gguf import read_gguf

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    """A model with its tokenizer, and the facts the rest of `app.ml` needs about it."""

    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    name: str
    # Where values derived from the weights are kept between processes (`app.ml.disk_cache`);
    # None: nowhere.
    cache_dir: Path | None = None
    adapter: ModelAdapter = field(init=False)

    def __post_init__(self) -> None:
        self.adapter = ModelAdapter(self.model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @cached_property
    def base_fingerprint(self) -> str:
        """The identity versions record for their base: `editable_fingerprint` as it was when
        first read, which must be before any delta is applied (a worker reads it before its first
        job, the serving engine when it loads the model)."""
        return editable_fingerprint(self)

    @property
    def context_length(self) -> int:
        config = self.model.config
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            value = getattr(config, key, None)
            if isinstance(value, int) and value > 0:
                return value
        return 2048


def editable_fingerprint(lm: LoadedModel) -> str:
    """Hash of the config and of the current values of every editable projection (each layer's
    MLP output projection)."""
    adapter = lm.adapter
    return fingerprint(lm.model, [adapter.mlp_out_param_name(i) for i in range(adapter.num_layers)])


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise InputError(f"unknown device {device!r}") from exc


def pick_dtype(device: torch.device, dtype: str = "auto") -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise InputError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)} or auto")
    return DTYPES[dtype]


def load_model(
    source: str = "demo",
    *,
    device: str = "auto",
    dtype: str = "auto",
    cache_dir: Path | None = None,
) -> LoadedModel:
    """Load `source`: "demo", a folder, a `.gguf` file, or a Hugging Face hub id."""
    torch_device = pick_device(device)
    torch_dtype = pick_dtype(torch_device, dtype)
    path = Path(source).expanduser()
    if source == "demo":
        model, tokenizer = _read_folder(demo_model_dir(cache_dir), torch_dtype)
    elif path.suffix == ".gguf":
        if not path.is_file():
            raise InputError(f"GGUF file not found: {source}")
        model, tokenizer = read_gguf(path, torch_dtype)
    elif path.exists() and not (path / "config.json").exists():
        raise InputError(f"{source}: not a model folder (no config.json)")
    elif not path.exists() and (path.is_absolute() or source.startswith((".", "~"))):
        raise InputError(f"{source}: no such file or folder")  # a path, not a hub id
    else:
        model, tokenizer = _read_folder(path if path.exists() else source, torch_dtype)
    model.to(torch_device)
    model.eval()
    model.requires_grad_(False)
    _ensure_pad_token(tokenizer)
    derived = (cache_dir or default_cache_dir()) / "derived"
    return LoadedModel(model=model, tokenizer=tokenizer, name=source, cache_dir=derived)


def _read_folder(source: Path | str, dtype: torch.dtype):
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except (OSError, ValueError) as exc:  # missing files, bad config, not a causal LM
        raise InputError(f"cannot load model {str(source)!r}: {exc}") from exc
    return model, tokenizer


def _ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
