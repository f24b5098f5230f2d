"""The store: SQLAlchemy models, sessions and queries; delta blobs as bytes (no torch here).

from app.store import crud, make_engine, make_sessionmaker
from app.store.errors import NotFound, ...
from app.store.migrate import upgrade
"""

from __future__ import annotations

from app.store import crud, errors
from app.store.db import make_engine, make_sessionmaker, ping
from app.store.models import ApiKey, Base, Corpus, DeltaRow, Job, Version

__all__ = [
    "ApiKey",
    "Base",
    "Corpus",
    "DeltaRow",
    "Job",
    "Version",
    "crud",
    "errors",
    "make_engine",
    "make_sessionmaker",
    "ping",
]
