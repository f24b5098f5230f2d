"""SafeEdit instances, with the published dataset's own field names so its files load as they are.

A file is a JSON list or JSON Lines of instances, or one instance as a JSON object. Loading never
raises anything but `InputError`, whose message names the file, the line or case, and the field at
fault.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from app.ml.errors import InputError
from app.ml.text_files import parse_json, read_text_file


class _Record(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="ignore", str_strip_whitespace=True)


class KnowledgeConstraint(_Record):
    prompt: str = Field(min_length=1)
    answer: str = Field(min_length=1)


class GeneralizationTest(_Record):
    only_question: str | None = Field(None, alias="test input of only harmful question")
    other_attack: str | None = Field(None, alias="test input of other attack prompt input")
    other_question: str | None = Field(None, alias="test input of other question input")
    other_both: str | None = Field(None, alias="test input of other questions and attack prompts")


class SafeEditInstance(_Record):
    id: str
    category: str | None = Field(None, alias="unsafety category")
    question: str | None = None
    adversarial_prompt: str = Field(alias="adversarial prompt", min_length=1)
    unsafe_generation: str = Field(alias="unsafe generation", min_length=1)
    safe_generation: str = Field(alias="safe generation", min_length=1)
    knowledge_constraint: KnowledgeConstraint = Field(alias="knowledge constrain")
    generalization: GeneralizationTest = Field(
        default_factory=GeneralizationTest, alias="generalization test"
    )

    @field_validator("id", mode="before")
    @classmethod
    def _id_as_text(cls, value: object) -> object:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


def parse_instance(data: object, *, where: str = "instance") -> SafeEditInstance:
    """Validate one instance; the error names `where` and the first offending field."""
    try:
        return SafeEditInstance.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "instance"
        case = data.get("id") if isinstance(data, dict) else None
        label = f"{where} (case {case})" if case is not None else where
        raise InputError(f"{label}: field {field!r}: {first['msg'].lower()}") from exc


def load_instances(path: str | Path) -> list[SafeEditInstance]:
    """Read a JSON list or JSON Lines file (or a single JSON object) of SafeEdit instances."""
    path = Path(path)
    text = read_text_file(path)
    if not text.strip():
        raise InputError(f"{path}: the file is empty")
    records = _json_records(path, text)
    if not records:
        raise InputError(f"{path}: contains no instances")
    instances = [parse_instance(data, where=where) for where, data in records]
    _check_unique_ids(path, instances)
    return instances


def select_cases(
    instances: list[SafeEditInstance], case_ids: list[str] | None, *, every: bool = False
) -> list[SafeEditInstance]:
    """The instances named by `case_ids` (in that order), or all of them with `every`."""
    if every and case_ids:
        raise InputError("give either --case or --all, not both")
    if every:
        return list(instances)
    if not case_ids:
        raise InputError("give the instance to edit on: --case ID (repeatable) or --all")
    if len(set(case_ids)) != len(case_ids):
        raise InputError("a case is named twice")
    return [find_case(instances, case_id) for case_id in case_ids]


def find_case(instances: list[SafeEditInstance], case_id: str) -> SafeEditInstance:
    for instance in instances:
        if instance.id == str(case_id):
            return instance
    known = ", ".join(i.id for i in instances[:5]) + (", ..." if len(instances) > 5 else "")
    raise InputError(f"unknown case {case_id!r}; the file has: {known}")


def _json_records(path: Path, text: str) -> list[tuple[str, object]]:
    stripped = text.lstrip()
    if stripped.startswith("["):
        data = parse_json(text, str(path))
        return [(f"{path}: item {n}", item) for n, item in enumerate(data)]
    if stripped.startswith("{") and "\n" in stripped.strip():
        # One object spread over several lines (pretty-printed) is one instance, not JSON Lines.
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            pass  # JSON Lines, or broken: the line-by-line pass below names the line
        else:
            return [(str(path), data)]
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((f"{path}:{lineno}", json.loads(line)))
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{lineno}: invalid JSON: {exc.msg}") from None
    return records


def _check_unique_ids(path: Path, instances: list[SafeEditInstance]) -> None:
    seen: set[str] = set()
    for instance in instances:
        if instance.id in seen:
            raise InputError(f"{path}: case id {instance.id!r} appears more than once")
        seen.add(instance.id)
