from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from app.store import migrate
from app.store.db import make_engine
from app.store.models import Base
from tests.conftest import BACKENDS

TABLES = {"jobs", "versions", "deltas", "corpora", "api_keys"}
ROOT = Path(__file__).resolve().parents[2]


def _tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


@pytest.mark.parametrize("backend", BACKENDS)
def test_upgrade_downgrade_upgrade(backend: str, new_database: Callable[[str], str]):
    url = new_database(backend)
    assert migrate.current_revision(url) is None

    migrate.upgrade(url)
    assert _tables(url) == TABLES
    assert migrate.current_revision(url) == migrate.head_revision() == "0001"

    migrate.downgrade(url, "base")
    assert _tables(url) == set()
    assert migrate.current_revision(url) is None

    migrate.upgrade(url)
    assert _tables(url) == TABLES


@pytest.mark.parametrize("backend", BACKENDS)
def test_migrations_match_the_models(backend: str, new_database: Callable[[str], str]):
    url = new_database(backend)
    migrate.upgrade(url)
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            assert compare_metadata(context, Base.metadata) == []
    finally:
        engine.dispose()


def test_alembic_command_takes_the_url_from_x(new_database: Callable[[str], str]):
    url = new_database("sqlite")
    command = [sys.executable, "-m", "alembic", "-x", f"url={url}", "upgrade", "head"]
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
    assert _tables(url) == TABLES
