"""Engines and sessions.

SQLite (the embedded default) runs in WAL mode with foreign keys on and a busy timeout, so the API
process and a worker process can share one file: readers never block the writer, and a writer
waits for the other instead of failing. PostgreSQL connections are checked before use.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

SQLITE_BUSY_TIMEOUT_MS = 30_000


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for `url` (sqlite:///PATH or postgresql+psycopg://...); kwargs go to SQLAlchemy."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        connect_args = {"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False}
        engine = create_engine(url, connect_args=connect_args, **kwargs)
        in_memory = parsed.database in (None, "", ":memory:")
        event.listen(engine, "connect", _sqlite_pragmas(wal=not in_memory))
        return engine
    if parsed.get_backend_name() == "postgresql":
        kwargs.setdefault("pool_pre_ping", True)
        return create_engine(url, **kwargs)
    backend = parsed.get_backend_name()
    raise ValueError(f"unsupported database {backend!r}: use sqlite or postgresql")


def _sqlite_pragmas(*, wal: bool) -> Any:
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        if wal:
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.close()

    return on_connect


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    """Sessions whose objects stay readable after commit (store functions commit, then return)."""
    return sessionmaker(engine, expire_on_commit=False)


def ping(engine: Engine) -> None:
    """Raises (sqlalchemy.exc.OperationalError, ...) when the database cannot be reached."""
    with engine.connect() as connection:
        connection.execute(text("SELECT 1"))
