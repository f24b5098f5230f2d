"""Alembic environment: the URL from the settings, the metadata from `app.store.models`.

The URL, first match wins: `config.attributes["url"]` (set by `app.store.migrate`), `-x url=...` on
the command line, then the settings (`DETOX_DATABASE_URL`, default SQLite under `DETOX_HOME`).
"""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context
from sqlalchemy import pool

from app.settings import get_settings
from app.store.db import make_engine
from app.store.models import Base

config = context.config
# Only the alembic command configures logging: called from a process (tests, `detox up`) it would
# replace that process's own logging set-up.
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def _url() -> str:
    url = config.attributes.get("url") or context.get_x_argument(as_dictionary=True).get("url")
    return url or get_settings().resolved_database_url()


def _options(url: str) -> dict[str, object]:
    return {
        "target_metadata": target_metadata,
        # SQLite cannot ALTER most things: later migrations copy-and-move tables instead.
        "render_as_batch": url.startswith("sqlite"),
        "compare_type": True,
    }


def run_migrations_offline() -> None:
    url = _url()
    context.configure(url=url, literal_binds=True, **_options(url))
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    url = _url()
    engine = make_engine(url, poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            context.configure(connection=connection, **_options(url))
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
