"""All configuration, read once from the environment (prefix `DETOX_`) and validated."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DETOX_", extra="ignore")

    home: Path = Field(Path(".detox"), description="state of the embedded default (DB, broker)")
    cache_dir: Path = Field(
        Path.home() / ".cache" / "detox", description="converted models, shared by processes"
    )
    model: str = Field("demo", description='"demo", a model folder, a .gguf file or a hub id')
    device: str = Field("auto", description='"auto" (CUDA when present), "cpu", "cuda:0", ...')
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    judge: str = Field("offline", description='"offline" or "hf:<model id or path>"')
    max_new_tokens: int = Field(64, ge=1, le=4096, description="evaluation generation length")
    eval_batch_size: int = Field(8, ge=1, le=256)


@lru_cache
def get_settings() -> Settings:
    return Settings()
