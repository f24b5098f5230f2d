"""What every store module shares: the one name rule, the page cap, and inserting a row that a
unique constraint guards."""

from __future__ import annotations

import re
from collections.abc import Callable

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.store.models import Base

MAX_PAGE = 1000  # the most rows one listing returns
RESERVED_NAMES = frozenset({"base", "latest"})
# The form of a name (versions, corpora, experiments): 1-64 of [A-Za-z0-9._-], alphanumeric first.
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
_NAME = re.compile(NAME_PATTERN)


def name_problem(name: str, what: str) -> str | None:
    """Why `name` cannot name a `what` ("version", "corpus"), or None when it can."""
    if name.lower() in RESERVED_NAMES:
        return f"{name!r} is reserved (it names the base model or the newest version)"
    if not _NAME.fullmatch(name):
        return (
            f"invalid {what} name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return None


def add_unique(
    session: Session,
    row: Base,
    *,
    clash: Callable[[], Exception | None],
    commit: bool = True,
) -> None:
    """Add `row` and commit (or only flush). When a unique constraint refuses it, the transaction
    is rolled back and `clash()` (called then) says what the clash means: the exception to raise
    (a Duplicate...), or None when it is not the clash the caller guards against, and the
    IntegrityError itself is raised."""
    session.add(row)
    try:
        session.commit() if commit else session.flush()
    except IntegrityError as exc:
        session.rollback()
        meaning = clash()
        if meaning is None:
            raise
        raise meaning from exc
