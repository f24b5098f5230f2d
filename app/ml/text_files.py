"""Reading the text files users hand in (SafeEdit instances, bias pairs, corpora), with errors that
name the file and what is wrong with it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from app.ml.errors import InputError


def read_text_file(path: Path) -> str:
    """The file's text as UTF-8, a byte order mark tolerated; any failure is an InputError."""
    try:
        return path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory, not a file") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from None


def parse_json(text: str, source: str) -> Any:
    """The JSON document `text` from `source`; invalid JSON is an InputError naming the line."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{source}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
