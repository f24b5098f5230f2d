"""Where the engine learns which versions exist and reads their deltas: the store, or a fake.

The engine never holds a database session in its decoding loop: it asks a `VersionSource` for the
live versions (polled) and for a version's whole chain of deltas (on a cache miss only).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from sqlalchemy.orm import Session, sessionmaker

from app.chains import ChainLink, UnreadableChain, read_chain
from app.serving.errors import ModelLoadError, UnknownModelError
from app.store import crud
from app.store import errors as store_errors


@dataclass(frozen=True)
class VersionInfo:
    """A live version as the engine lists it."""

    id: int
    name: str
    parent: str  # "base" or the parent version's name
    created_at: datetime


class VersionSource(Protocol):
    def live_versions(self) -> list[VersionInfo]:
        """Every live (not retired) version, oldest first."""
        ...

    def load_chain(self, version_id: int) -> list[ChainLink]:
        """The version's whole chain, root first, checksums and base verified (retired versions
        too: each link says whether it is). UnknownModelError, ModelLoadError."""
        ...


class StoreVersionSource:
    """Versions and deltas from the database, through `app.store.crud` only."""

    def __init__(self, sessions: sessionmaker[Session], *, base_fingerprint: str | None = None):
        self._sessions = sessions
        self._base_fingerprint = base_fingerprint

    def live_versions(self) -> list[VersionInfo]:
        with self._sessions() as session:
            return [
                VersionInfo(v.id, v.name, v.parent_name, v.created_at)
                for v in crud.list_versions(session=session)
            ]

    def load_chain(self, version_id: int) -> list[ChainLink]:
        try:
            with self._sessions() as session:
                return read_chain(session, version_id, base_fingerprint=self._base_fingerprint)
        except store_errors.NotFound as exc:
            raise UnknownModelError(str(exc)) from exc
        except UnreadableChain as exc:
            raise ModelLoadError(str(exc)) from exc
