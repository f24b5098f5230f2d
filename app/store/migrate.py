"""Run the Alembic migration chain from Python (`detox up`, `detox api`, tests).

`alembic.ini` and `migrations/` live at the repository root, next to `app/`; the alembic command
works too (`.venv/bin/alembic upgrade head`, `-x url=...` to name a database).
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from app.store.db import make_engine

ROOT = Path(__file__).resolve().parents[2]
ALEMBIC_INI = ROOT / "alembic.ini"


def alembic_config(url: str) -> Config:
    if not ALEMBIC_INI.is_file():
        raise FileNotFoundError(f"{ALEMBIC_INI} is missing: run from a checkout of the repository")
    config = Config(str(ALEMBIC_INI))
    config.set_main_option("script_location", str(ROOT / "migrations"))
    config.attributes["url"] = url
    config.attributes["configure_logger"] = False
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Migrate the database at `url` up to `revision` (creating the tables on a new database)."""
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str = "base") -> None:
    """Migrate down to `revision`; "base" drops every table of the chain."""
    command.downgrade(alembic_config(url), revision)


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def current_revision(url: str) -> str | None:
    """The revision the database is at (None for a database the chain never touched)."""
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()
