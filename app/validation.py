"""How a pydantic validation error is told to a user: the field as a path (`params.lr`,
`forget[3].text`) and the first problem as one line. The API's error envelope and the worker's
reading of a stored job spec say it the same way."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

_REQUEST_PARTS = ("body", "query", "path", "header", "cookie")


def field_path(loc: Sequence[str | int]) -> str | None:
    """("body", "params", "lr") -> "params.lr", ("body", "forget", 3, "text") -> "forget[3].text";
    the request part ("body", "query") is dropped."""
    parts = list(loc)
    if parts and parts[0] in _REQUEST_PARTS:
        parts = parts[1:]
    name = ""
    for part in parts:
        if isinstance(part, int):
            name += f"[{part}]"
        else:
            name += f".{part}" if name else str(part)
    return name or None


def problem_message(error: dict[str, Any], path: str | None) -> str:
    """One error of `ValidationError.errors()` as "path: what is wrong"."""
    message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    return f"{path}: {message}" if path else message
