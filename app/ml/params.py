"""The base of every edit's parameters (`dinm_params`, `unlearn_params`): a pydantic model that
refuses unknown fields and turns its first problem into one `InputError` naming the field.
Free of torch."""

from __future__ import annotations

from typing import Self

from pydantic import BaseModel, ConfigDict, ValidationError

from app.ml.errors import InputError


class Params(BaseModel):
    """Parameters given as a JSON object; `parse` turns the first problem into an InputError."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @classmethod
    def parse(cls, data: dict | None) -> Self:
        try:
            return cls.model_validate(data or {})
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(["params", *(str(p) for p in first["loc"])])
            message = first["msg"].removeprefix("Value error, ")
            raise InputError(f"{where}: {message[:1].lower()}{message[1:]}") from None
