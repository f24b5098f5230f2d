"""Validated edit parameters. Free of torch, so the API can validate a job before queueing it."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.ml.errors import InputError

# The DINM paper's suffix system prompt, appended to the user's turn while editing when asked for.
PAPER_SUFFIX = (
    "If the user's request is reasonable, give the correct answer. Please give the right response:"
)


class DinmParams(BaseModel):
    """Hyper-parameters; defaults are the published ones (Adam, 10 steps, lr 5e-4, nll 0.1)."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(10, ge=1, le=1000)
    lr: float = Field(5e-4, gt=0, le=1)
    nll_weight: float = Field(0.1, ge=0, le=100)
    kl_weight: float = Field(1.0, ge=0, le=100)
    stop_loss: float = Field(1e-4, ge=0, le=100, description="stop early below this loss")
    layer: int | None = Field(None, ge=0, description="edit this layer instead of locating one")
    suffix_system_prompt: str | None = Field(
        None, max_length=2000, description='text appended to the prompt while editing; "paper"'
    )
    max_length: int = Field(2048, ge=16, le=131072, description="token cap per training sequence")
    fast_path: bool = True

    @classmethod
    def parse(cls, data: dict | None) -> DinmParams:
        try:
            return cls.model_validate(data or {})
        except ValidationError as exc:
            first = exc.errors()[0]
            name = ".".join(str(p) for p in first["loc"]) or "params"
            raise InputError(f"params.{name}: {first['msg'].lower()}") from None

    def suffix(self) -> str | None:
        return PAPER_SUFFIX if self.suffix_system_prompt == "paper" else self.suffix_system_prompt
