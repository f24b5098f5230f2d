"""A job's spec (the POST body as stored on the row) read into what the edit needs.

Parsing errors become `JobInputError`s naming the field as the API would (`instance.<field>`,
`params.<field>`, `name`, `kind`), so a job that slipped past the API's validation (an older
API, a row written by hand) still fails with a clear, field-level error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from app.ml.errors import InputError
from app.ml.params import DinmParams
from app.ml.safeedit import SafeEditInstance, parse_instance
from app.store import crud
from app.store.errors import InvalidVersionName
from workers.errors import JobInputError

SUPPORTED_KINDS = ("dinm",)


@dataclass(frozen=True)
class DinmSpec:
    instance: SafeEditInstance
    params: DinmParams
    name: str | None  # the version's name; None: the store picks v{N}


def parse_spec(kind: str, spec: Any) -> DinmSpec:
    if kind not in SUPPORTED_KINDS:
        raise JobInputError(
            "unsupported_kind",
            f"this worker runs {', '.join(SUPPORTED_KINDS)} jobs, not {kind!r}",
            "kind",
        )
    if not isinstance(spec, dict):
        raise JobInputError("invalid_spec", "the job's spec is not a JSON object")
    return DinmSpec(
        instance=_instance(spec.get("instance")),
        params=_params(spec.get("params")),
        name=_name(spec.get("name")),
    )


def _instance(data: Any) -> SafeEditInstance:
    if data is None:
        raise JobInputError(
            "invalid_instance", "instance: a SafeEdit instance is required", "instance"
        )
    try:
        return parse_instance(data, where="instance")
    except InputError as exc:
        raise JobInputError("invalid_instance", str(exc), _field("instance", exc)) from exc


def _params(data: Any) -> DinmParams:
    if data is not None and not isinstance(data, dict):
        raise JobInputError("invalid_params", "params: must be a JSON object", "params")
    try:
        return DinmParams.parse(data)
    except InputError as exc:
        raise JobInputError("invalid_params", str(exc), _field("params", exc)) from exc


def _name(name: Any) -> str | None:
    if name is None:
        return None
    if not isinstance(name, str):
        raise JobInputError("invalid_version_name", "name: must be a string", "name")
    try:
        return crud.check_version_name(name)
    except InvalidVersionName as exc:
        raise JobInputError("invalid_version_name", str(exc), "name") from exc


def _field(prefix: str, exc: InputError) -> str:
    """`prefix.<location>` of the pydantic error behind `exc` (raised `from` it, or within it)."""
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, ValidationError) and cause.errors():
        location = ".".join(str(part) for part in cause.errors()[0]["loc"])
        return f"{prefix}.{location}" if location else prefix
    return prefix
