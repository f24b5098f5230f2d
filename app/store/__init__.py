"""The store: SQLAlchemy models, sessions and queries; delta blobs as bytes (no torch here).

`crud` is the one entry point for queries; it re-exports the private modules that hold them by
concern: `_jobs` (queue, claim, heartbeat, cancel), `_job_results` (a job's successful end with its
version or eval results), `_versions`, `_deltas` (delta rows read back verified), `_corpora`,
`_experiments`, `_keys` (API keys), `_stats` (the metrics queries), `_rows` (names, pages, unique
inserts).

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
