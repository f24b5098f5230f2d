from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text

from app.ml.corpus import Document
from app.store import crud, migrate
from app.store._types import utcnow
from app.store.db import make_engine, make_sessionmaker
from app.store.models import Base
from tests.conftest import BACKENDS

TABLES = {"jobs", "versions", "deltas", "corpora", "api_keys", "experiments", "experiment_outcomes"}
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
    assert migrate.current_revision(url) == migrate.head_revision() == "0006"

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


@pytest.mark.parametrize("backend", BACKENDS)
def test_0002_carries_0001_corpora_over_and_back(backend: str, new_database: Callable[[str], str]):
    url = new_database(backend)
    migrate.upgrade(url, "0001")
    rows = [  # (id, name, text): 0001 kept plain text, one example a line
        ("00000000-0000-0000-0000-000000000001", "gender", "first line\r\n\n  second line\n"),
        ("00000000-0000-0000-0000-000000000002", "gender", "a taken name\n"),
        ("00000000-0000-0000-0000-000000000003", "not a valid name!", "x\n"),
        ("00000000-0000-0000-0000-000000000004", "empty", "\n \n"),
    ]
    engine = make_engine(url)
    try:
        with engine.begin() as connection:
            for corpus_id, name, body in rows:
                connection.execute(
                    text(
                        "INSERT INTO corpora (id, name, lines, nbytes, sha256, text, created_at) "
                        "VALUES (:id, :name, 1, 1, 'x', :text, :created_at)"
                    ),
                    {"id": corpus_id, "name": name, "text": body, "created_at": utcnow()},
                )
        migrate.upgrade(url)
        with make_sessionmaker(engine)() as session:
            kept = crud.list_corpora(session=session)
            assert sorted((c.id[-1], c.name, c.documents, c.annotated) for c in kept) == [
                ("1", "gender", 2, 0),
                ("2", None, 1, 0),  # the name was taken: dropped, the corpus kept
                ("3", None, 1, 0),  # an invalid name
            ]  # the row without a line is gone
            first = crud.corpus_documents(session=session, corpus_id="gender")
            assert first == [Document("first line"), Document("  second line")]
            spanned = [Document("two\nlines \u2028 three", ((0, 3),))]
            new_id = crud.create_corpus(session=session, documents=spanned, name="new").id
        migrate.downgrade(url, "0001")
        with engine.connect() as connection:
            back = connection.execute(text("SELECT id, name, lines, text FROM corpora")).all()
        assert sorted((i[-1], n, lines, t) for i, n, lines, t in back) == sorted(
            [
                ("1", "gender", 2, "first line\n  second line\n"),
                ("2", "00000000-0000-0000-0000-000000000002", 1, "a taken name\n"),
                ("3", "00000000-0000-0000-0000-000000000003", 1, "x\n"),
                (new_id[-1], "new", 1, "two lines   three\n"),  # one text a line, spans lost
            ]
        )
    finally:
        engine.dispose()


@pytest.mark.parametrize("backend", BACKENDS)
def test_0003_keeps_jobs_and_keys_both_ways(backend: str, new_database: Callable[[str], str]):
    url = new_database(backend)
    migrate.upgrade(url, "0002")
    engine = make_engine(url)
    insert_job = text(
        "INSERT INTO jobs (id, kind, status, progress, spec, attempts, cancel_requested, "
        "created_at) VALUES ('j1', 'dinm', 'queued', 0, '{}', 0, false, :now)"
    )
    insert_key = text(
        "INSERT INTO api_keys (name, key_hash, role, created_at) VALUES ('k', 'h', 'reader', :now)"
    )
    try:
        with engine.begin() as connection:
            connection.execute(insert_job, {"now": utcnow()})
            connection.execute(insert_key, {"now": utcnow()})
        migrate.upgrade(url)
        with engine.connect() as connection:
            assert connection.execute(text("SELECT id, api_key_id FROM jobs")).all() == [
                ("j1", None)
            ]
            assert connection.execute(text("SELECT name, prefix FROM api_keys")).all() == [
                ("k", None)
            ]
        migrate.downgrade(url, "0002")
        with engine.connect() as connection:
            assert connection.execute(text("SELECT id FROM jobs")).all() == [("j1",)]
            assert connection.execute(text("SELECT name FROM api_keys")).all() == [("k",)]
    finally:
        engine.dispose()


@pytest.mark.parametrize("backend", BACKENDS)
def test_0006_keeps_old_offline_experiments_on_offline_1(
    backend: str, new_database: Callable[[str], str]
):
    url = new_database(backend)
    migrate.upgrade(url, "0005")
    engine = make_engine(url)
    insert = text(
        "INSERT INTO experiments (name, status, arms, judge, keep_text, created_at) "
        "VALUES (:name, 'running', '[]', :judge, false, :now)"
    )
    select = text("SELECT name, judge FROM experiments ORDER BY name")
    try:
        with engine.begin() as connection:
            for name, judge in (("a", "offline"), ("b", "service"), ("c", "none")):
                connection.execute(insert, {"name": name, "judge": judge, "now": utcnow()})
        migrate.upgrade(url)
        with engine.connect() as connection:  # judged by offline/1 so far: they stay on it
            assert connection.execute(select).all() == [
                ("a", "offline/1"), ("b", "service"), ("c", "none")
            ]  # fmt: skip
        migrate.downgrade(url, "0005")
        with engine.connect() as connection:
            assert connection.execute(select).all()[0] == ("a", "offline")
    finally:
        engine.dispose()
