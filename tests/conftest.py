"""Shared fixtures. One migrated database per backend for the whole session (SQLite in a temporary
folder, a fresh PostgreSQL database made through the `test` database), emptied after every test
and dropped at the end. Tests that take `session`, `session_factory` or `store_engine` run once
per backend (store, API and worker tests alike)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, delete, text, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from app.store import migrate
from app.store.db import make_engine, make_sessionmaker
from app.store.models import (
    ApiKey,
    Corpus,
    DeltaRow,
    Experiment,
    ExperimentOutcome,
    Job,
    Version,
)
from tests.services import ADMIN_KEY

os.environ["DETOX_ADMIN_KEY"] = ADMIN_KEY
os.environ["DETOX_API_KEY"] = ADMIN_KEY

PG_ADMIN_URL = os.environ.get(
    "DETOX_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(scope="session")
def new_database(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], str]]:
    """new_database(backend) -> the URL of a fresh, empty database of that backend."""
    admin: Engine | None = None
    created: list[str] = []

    def make(backend: str) -> str:
        nonlocal admin
        if backend == "sqlite":
            return f"sqlite:///{tmp_path_factory.mktemp('db') / 'detox.db'}"
        if admin is None:
            admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
            try:
                admin.connect().close()
            except OperationalError as exc:
                pytest.fail(
                    f"PostgreSQL is not reachable at {PG_ADMIN_URL} ({exc.orig}); "
                    "run scripts/services.sh"
                )
        name = f"detox_test_{uuid.uuid4().hex[:12]}"
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        created.append(name)
        return make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)

    yield make
    if admin is not None:
        with admin.connect() as connection:
            for name in created:
                connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="session", params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="session")
def store_engine(backend: str, new_database: Callable[[str], str]) -> Iterator[Engine]:
    url = new_database(backend)
    migrate.upgrade(url)
    engine = make_engine(url)
    yield engine
    engine.dispose()


@pytest.fixture
def session_factory(store_engine: Engine) -> Iterator[sessionmaker[Session]]:
    yield make_sessionmaker(store_engine)
    _empty(store_engine)


@pytest.fixture
def session(session_factory: sessionmaker[Session]) -> Iterator[Session]:
    with session_factory() as session:
        yield session


def _empty(engine: Engine) -> None:
    with engine.begin() as connection:
        connection.execute(delete(DeltaRow))
        connection.execute(delete(ExperimentOutcome))
        connection.execute(delete(Experiment))
        connection.execute(update(Job).values(parent_version_id=None, result_version_id=None))
        connection.execute(update(Version).values(parent_id=None, job_id=None))
        for model in (Version, Job, Corpus, ApiKey):
            connection.execute(delete(model))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random llama with its tokenizer and chat template, saved like any HF model."""
    from tests.factories import tiny_model  # torch is imported only by tests that need it

    path = tmp_path_factory.mktemp("tiny-llama")
    lm = tiny_model("llama")
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return path
