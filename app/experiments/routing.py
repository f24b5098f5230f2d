"""Which arm of an experiment serves a request for `exp:<name>`.

`ExperimentRouter` keeps the experiments it has read for `ttl_s` (a stop made by another API
process is seen within that time; one made here at once); when the database is down it keeps
routing on what it read last. Only a dictionary lookup runs on the caller's path while the
experiment is cached.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from app.experiments.assign import Arm, assign, user_hash
from app.serving.errors import UnknownModelError
from app.store import crud
from app.store.errors import NotFound
from app.store.models import Experiment

log = logging.getLogger(__name__)

PREFIX = "exp:"


@dataclass(frozen=True)
class Snapshot:
    """An experiment as routing needs it."""

    id: int
    name: str
    running: bool
    arms: tuple[Arm, ...]
    winner: str | None
    judge: str
    keep_text: bool

    @classmethod
    def of(cls, row: Experiment) -> Snapshot:
        return cls(
            id=row.id,
            name=row.name,
            running=row.status == "running",
            arms=tuple(Arm(a["model"], float(a["weight"])) for a in row.arms),
            winner=row.winner,
            judge=row.judge,
            keep_text=row.keep_text,
        )


@dataclass(frozen=True)
class Assignment:
    """Which model serves a request of an experiment; `recorded`: whether it counts (only
    while the experiment runs)."""

    experiment: Snapshot
    model: str
    user_hash: str | None

    @property
    def recorded(self) -> bool:
        return self.experiment.running


class ExperimentRouter:
    def __init__(self, sessions: Any, *, ttl_s: float = 1.0):
        self._sessions = sessions
        self._ttl_s = ttl_s
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[float, Snapshot]] = {}

    def route(self, model: str, user: str | None) -> Assignment | None:
        """None for a model that is not `exp:<name>`; else the arm that serves it. Blocking
        (may read the store); UnknownModelError for an unknown experiment."""
        if not model.startswith(PREFIX):
            return None
        experiment = self.snapshot(model.removeprefix(PREFIX))
        if experiment.running:
            chosen = assign(experiment.name, experiment.arms, user).model
        else:
            chosen = experiment.winner or "base"
        return Assignment(experiment, chosen, user_hash(user))

    def snapshot(self, name: str) -> Snapshot:
        with self._lock:
            cached = self._cache.get(name)
        if cached is not None and time.monotonic() - cached[0] < self._ttl_s:
            return cached[1]
        try:
            with self._sessions() as session:
                snapshot = Snapshot.of(crud.get_experiment(session=session, name=name))
        except NotFound:
            self.forget(name)
            raise UnknownModelError(f"there is no experiment named {name!r}") from None
        except SQLAlchemyError:
            if cached is None:
                raise
            log.warning("database unavailable: routing experiment %r as last read", name)
            return cached[1]
        with self._lock:
            self._cache[name] = (time.monotonic(), snapshot)
        return snapshot

    def forget(self, name: str) -> None:
        """Read `name` afresh next time (after a change made in this process)."""
        with self._lock:
            self._cache.pop(name, None)
