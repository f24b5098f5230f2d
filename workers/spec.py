"""A job's spec (the POST body as stored on the row) read into what the edit needs.

Parsing errors become `JobInputError`s naming the field as the API would (`instance.<field>`,
`params.<field>`, `name`, `kind`), so a job that slipped past the API's validation (an older
API, a row written by hand) still fails with a clear, field-level error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import ValidationError

from app.ml.corpus import Document, documents_from_json
from app.ml.errors import InputError
from app.ml.params import DinmParams, Params
from app.ml.safeedit import SafeEditInstance, parse_instance
from app.ml.unlearn_params import METHODS, UnlearnParams
from app.store import crud
from app.store.errors import InvalidVersionName
from workers.errors import JobInputError

P = TypeVar("P", bound=Params)

SUPPORTED_KINDS = ("dinm", "unlearn", "eval")
SUITES = ("safeedit", "bias", "perplexity")


@dataclass(frozen=True)
class DinmSpec:
    instance: SafeEditInstance
    params: DinmParams
    name: str | None  # the version's name; None: the store picks v{N}


@dataclass(frozen=True)
class UnlearnSpec:
    method: str
    forget: list[Document] | None  # inline documents, or
    corpus_id: str | None  # a stored corpus
    retain: list[Document] | None
    retain_corpus_id: str | None
    params: UnlearnParams
    name: str | None


@dataclass(frozen=True)
class EvalSpec:
    suites: tuple[str, ...]
    limit: int | None
    bias_types: list[str] | None
    instances: list[SafeEditInstance] | None
    texts: list[str] | None


Spec = DinmSpec | UnlearnSpec | EvalSpec


def parse_spec(kind: str, spec: Any) -> Spec:
    if kind not in SUPPORTED_KINDS:
        raise JobInputError(
            "unsupported_kind",
            f"this worker runs {', '.join(SUPPORTED_KINDS)} jobs, not {kind!r}",
            "kind",
        )
    if not isinstance(spec, dict):
        raise JobInputError("invalid_spec", "the job's spec is not a JSON object")
    if kind == "unlearn":
        return _unlearn(spec)
    if kind == "eval":
        return _eval(spec)
    return DinmSpec(
        instance=_instance(spec.get("instance")),
        params=_params(spec.get("params"), DinmParams),
        name=_name(spec.get("name")),
    )


def _unlearn(spec: dict[str, Any]) -> UnlearnSpec:
    method = spec.get("method", "masked_ga")
    if method not in METHODS:
        raise JobInputError(
            "invalid_method", f"method: must be one of {', '.join(METHODS)}", "method"
        )
    forget, corpus_id = spec.get("forget"), spec.get("corpus_id")
    if (forget is None) == (corpus_id is None):
        raise JobInputError(
            "invalid_forget", "give exactly one of `forget` and `corpus_id`", "forget"
        )
    return UnlearnSpec(
        method=method,
        forget=_documents(forget, "forget"),
        corpus_id=_optional_str(corpus_id, "corpus_id"),
        retain=_documents(spec.get("retain"), "retain"),
        retain_corpus_id=_optional_str(spec.get("retain_corpus_id"), "retain_corpus_id"),
        params=_params(spec.get("params"), UnlearnParams),
        name=_name(spec.get("name")),
    )


def _eval(spec: dict[str, Any]) -> EvalSpec:
    suites = spec.get("suites") or list(SUITES)
    if not isinstance(suites, list) or not set(suites) <= set(SUITES):
        raise JobInputError(
            "invalid_suites", f"suites: a list drawn from {', '.join(SUITES)}", "suites"
        )
    params = spec.get("params") or {}
    if not isinstance(params, dict):
        raise JobInputError("invalid_params", "params: must be a JSON object", "params")
    limit = params.get("limit")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise JobInputError("invalid_params", "params.limit: a positive integer", "params.limit")
    instances = params.get("instances")
    return EvalSpec(
        suites=tuple(dict.fromkeys(suites)),
        limit=limit,
        bias_types=_strings(params.get("bias_types"), "params.bias_types"),
        instances=None if instances is None else _instances(instances),
        texts=_strings(params.get("texts"), "params.texts"),
    )


def _instance(data: Any, where: str = "instance") -> SafeEditInstance:
    if data is None:
        raise JobInputError("invalid_instance", f"{where}: a SafeEdit instance is required", where)
    try:
        return parse_instance(data, where=where)
    except InputError as exc:
        raise JobInputError("invalid_instance", str(exc), _field(where, exc)) from exc


def _instances(data: Any) -> list[SafeEditInstance]:
    if not isinstance(data, list) or not data:
        raise JobInputError(
            "invalid_instance", "params.instances: a non-empty list", "params.instances"
        )
    return [_instance(item, f"params.instances[{i}]") for i, item in enumerate(data)]


def _documents(data: Any, where: str) -> list[Document] | None:
    if data is None:
        return None
    try:
        return documents_from_json(data, where=where)
    except InputError as exc:
        raise JobInputError(f"invalid_{where}", str(exc), where) from exc


def _strings(data: Any, where: str) -> list[str] | None:
    if data is None:
        return None
    if not isinstance(data, list) or not all(isinstance(x, str) and x for x in data):
        raise JobInputError("invalid_params", f"{where}: a list of non-empty strings", where)
    return data


def _optional_str(data: Any, where: str) -> str | None:
    if data is not None and not isinstance(data, str):
        raise JobInputError(f"invalid_{where}", f"{where}: must be a string", where)
    return data


def _params(data: Any, kind: type[P]) -> P:
    if data is not None and not isinstance(data, dict):
        raise JobInputError("invalid_params", "params: must be a JSON object", "params")
    try:
        return kind.parse(data)
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
