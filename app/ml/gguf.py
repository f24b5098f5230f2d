"""Reading a GGUF file (llama.cpp's format) into a plain transformers model."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from app.ml.errors import InputError


def read_gguf(path: Path, dtype: torch.dtype = torch.float32):
    """Read a GGUF file into a plain (de-quantised, serialisable) transformers model."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    except (OSError, ValueError) as exc:  # not GGUF, or an architecture transformers cannot read
        raise InputError(f"cannot read GGUF file {str(path)!r}: {exc}") from exc
    # The weights are already de-quantised: forget the GGUF quantiser so the model can be saved.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer
