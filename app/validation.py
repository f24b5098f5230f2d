"""How a pydantic validation error is told to a user: the field as a path (`params.lr`,
`forget[3].text`) and the first problem as one line. The API's error envelope and the worker's
reading of a stored job spec say it the same way. Also `UnicodeStr`, a string field that refuses
what is not valid Unicode."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Annotated, Any

from pydantic import AfterValidator
from pydantic_core import PydanticCustomError

_REQUEST_PARTS = ("body", "query", "path", "header", "cookie")
_SURROGATE = re.compile("[\ud800-\udfff]")


def valid_unicode(value: str) -> str:
    """`value`, or the `string_unicode` error when it holds an unpaired surrogate (a JSON escape
    such as "\\ud800" alone): not valid Unicode, so no tokenizer, judge or UTF-8 answer can take
    it. pydantic checks this itself only for constrained strings (a length, a pattern)."""
    if _SURROGATE.search(value):
        message = "Input should be valid Unicode: it holds an unpaired surrogate (\\ud800-\\udfff)"
        raise PydanticCustomError("string_unicode", message)
    return value


def valid_unicode_texts(value: Any) -> Any:
    """`valid_unicode` on a string or on each string of a list (for `str | list[...]` fields,
    checked in a field validator: the error then names the field, not a member of the union)."""
    for text in [value] if isinstance(value, str) else value or ():
        if isinstance(text, str):
            valid_unicode(text)
    return value


# A string that must be valid Unicode: every text of a request that reaches a tokenizer or judge.
UnicodeStr = Annotated[str, AfterValidator(valid_unicode)]


# How pydantic names a member of a union in an error's location ("str", "list[TextPart]",
# "function-after[...]", a model's class name): not a field, so not part of the field's path.
_UNION_MEMBER = re.compile(r"[\[(]|^(str|int|float|bool|bytes|list|dict|none)$|^[A-Z]")


def field_path(loc: Sequence[str | int]) -> str | None:
    """("body", "params", "lr") -> "params.lr", ("body", "forget", 3, "text") -> "forget[3].text";
    the request part ("body", "query") and union members ("prompt", "str") are dropped."""
    parts = list(loc)
    if parts and parts[0] in _REQUEST_PARTS:
        parts = parts[1:]
    name = ""
    for part in parts:
        if isinstance(part, int):
            name += f"[{part}]"
        elif not _UNION_MEMBER.search(part):
            name += f".{part}" if name else str(part)
    return name or None


def first_problem(errors: Sequence[Any]) -> dict[str, Any]:
    """The error to tell: the first that is not a wrong type when there are several (a union's
    members each report one: the member of the input's type says what is wrong with it)."""
    if not errors:
        return {}
    fitting = [e for e in errors if not str(e.get("type", "")).endswith("_type")]
    return dict((fitting or list(errors))[0])


def problem_message(error: dict[str, Any], path: str | None) -> str:
    """One error of `ValidationError.errors()` as "path: what is wrong"."""
    message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    return f"{path}: {message}" if path else message
