"""The input of `detox judge`: JSON Lines of `{"prompt": ..., "response": ...}` with an optional
`"harmful": true|false` (default true), judged in order.

Every line is checked before anything is judged, and the first bad one is an InputError that names
its line: invalid JSON, not an object, a missing or non-string `prompt` or `response`, a `harmful`
that is not true or false, or an unknown field (so that a misspelt one is never ignored). Blank
lines are skipped; a file without a line to judge is an error too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.ml.errors import InputError
from app.ml.text_files import read_text_file

FIELDS = ("prompt", "response", "harmful")


@dataclass(frozen=True)
class JudgeItem:
    prompt: str
    response: str
    harmful: bool = True
    line: int = 0  # 1-based line of the file


def parse_item(data: Any, line: int) -> JudgeItem:
    """One line's JSON value as an item (InputError naming the line if it is not one)."""
    if not isinstance(data, dict):
        raise InputError(f"line {line}: expected a JSON object with `prompt` and `response`")
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise InputError(
            f"line {line}: unknown field {unknown[0]!r} (allowed: {', '.join(FIELDS)})"
        )
    for field in ("prompt", "response"):
        if field not in data:
            raise InputError(f"line {line}: missing `{field}`")
        if not isinstance(data[field], str):
            raise InputError(f"line {line}: `{field}` must be a string")
    harmful = data.get("harmful", True)
    if not isinstance(harmful, bool):
        raise InputError(f"line {line}: `harmful` must be true or false")
    return JudgeItem(data["prompt"], data["response"], harmful, line)


def parse_items(text: str) -> list[JudgeItem]:
    """Every item of a JSON Lines text, all checked."""
    items = []
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise InputError(
                f"line {number}: invalid JSON: {exc.msg} (column {exc.colno})"
            ) from None
        items.append(parse_item(data, number))
    if not items:
        raise InputError("holds no line to judge")
    return items


def read_items(path: Path) -> list[JudgeItem]:
    """The items of a JSON Lines file; any problem is an InputError naming the file (and line)."""
    text = read_text_file(path)
    try:
        return parse_items(text)
    except InputError as exc:
        raise InputError(f"{path}: {exc}") from None
