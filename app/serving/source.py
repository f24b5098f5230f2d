"""Where the engine learns which versions exist and reads their deltas (the store's source is
built by `app.serving.factory`; tests may pass their own).

The engine never holds a database session in its decoding loop: it asks a `VersionSource` for the
live versions (polled, and at once when a `Subscribe` hook announces a change) and for a version's
whole chain of deltas (on a cache miss only).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from app.chains import ChainLink


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


class Subscription(Protocol):
    def stop(self) -> None: ...


# Given the engine's refresh, start calling it whenever versions change; stop() ends that.
Subscribe = Callable[[Callable[[], None]], Subscription]
