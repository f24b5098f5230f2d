from __future__ import annotations

import inspect
import subprocess
import sys
from collections.abc import Callable

import pytest
from sqlalchemy import text

import app.store
from app.store import crud
from app.store.db import SQLITE_BUSY_TIMEOUT_MS, make_engine, ping


def test_sqlite_is_set_up_for_two_processes(new_database: Callable[[str], str]):
    engine = make_engine(new_database("sqlite"))
    try:
        ping(engine)
        with engine.connect() as connection:
            pragma = lambda name: connection.execute(text(f"PRAGMA {name}")).scalar()  # noqa: E731
            assert pragma("journal_mode") == "wal"
            assert pragma("foreign_keys") == 1
            assert pragma("busy_timeout") == SQLITE_BUSY_TIMEOUT_MS
    finally:
        engine.dispose()


def test_postgresql_connections_are_checked_before_use():
    engine = make_engine("postgresql+psycopg://postgres@127.0.0.1:5432/test")
    assert engine.pool._pre_ping
    engine.dispose()


def test_other_databases_are_refused():
    with pytest.raises(ValueError, match="mysql"):
        make_engine("mysql://localhost/x")


def test_public_surface_is_sorted_and_complete():
    for module in (crud, app.store):
        assert module.__all__ == sorted(module.__all__, key=lambda n: (not n.isupper(), n))
        assert all(hasattr(module, name) for name in module.__all__)
    functions = {n for n, f in vars(crud).items() if inspect.isfunction(f)}
    assert functions <= set(crud.__all__)


def test_crud_functions_are_keyword_only():
    for name in crud.__all__:
        function = getattr(crud, name)
        if inspect.isfunction(function) and "session" in inspect.signature(function).parameters:
            kinds = {p.kind for p in inspect.signature(function).parameters.values()}
            assert kinds == {inspect.Parameter.KEYWORD_ONLY}, name


def test_the_store_does_not_import_torch():
    code = "import sys, app.store, app.store.migrate; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
