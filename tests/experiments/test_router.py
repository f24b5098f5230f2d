"""The experiment router on a real (SQLite) store: a stop made elsewhere is seen once the
cache time has passed; with the database gone it keeps routing on what it read last."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import text

from app.experiments.routing import ExperimentRouter
from app.serving.errors import UnknownModelError
from app.store import crud, migrate
from app.store.db import make_engine, make_sessionmaker

ARMS = [{"model": "base", "weight": 1}, {"model": "v1", "weight": 1}]


@pytest.fixture
def sessions(tmp_path):
    url = f"sqlite:///{tmp_path / 'router.db'}"
    migrate.upgrade(url)
    engine = make_engine(url)
    yield make_sessionmaker(engine)
    engine.dispose()


def test_not_an_experiment_unknown_and_stopped_elsewhere(sessions):
    router = ExperimentRouter(sessions, ttl_s=0.2)
    assert router.route("v1", "alice") is None
    with pytest.raises(UnknownModelError, match="no experiment named 'e1'"):
        router.route("exp:e1", "alice")
    with sessions() as session:
        crud.create_experiment(session=session, name="e1", arms=ARMS, judge="none")
    running = router.route("exp:e1", "alice")
    assert running is not None and running.recorded and running.model in {"base", "v1"}
    with sessions() as session:  # another API process stops it
        crud.stop_experiment(session=session, name="e1", winner="v1")
    time.sleep(0.3)
    stopped = router.route("exp:e1", "alice")
    assert stopped is not None and stopped.model == "v1" and not stopped.recorded


def test_a_database_outage_routes_on_the_last_read(sessions):
    router = ExperimentRouter(sessions, ttl_s=0.0)
    with sessions() as session:
        crud.create_experiment(session=session, name="e1", arms=ARMS, judge="none")
    before = router.route("exp:e1", "alice")
    with sessions() as session:  # the tables go away: every read now fails
        session.execute(text("DROP TABLE experiment_outcomes"))
        session.execute(text("DROP TABLE experiments"))
        session.commit()
    assert router.route("exp:e1", "alice") == before
    with pytest.raises(Exception, match="no such table"):
        router.route("exp:other", "alice")
