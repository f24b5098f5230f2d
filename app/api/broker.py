"""The API's view of the job queue: enqueue a job id, check the broker answers.

`CeleryBroker` delegates to the workers package's Celery app, built from the API's own settings
on first use (so importing the API stays light); tests and other front ends can pass any object
with these two methods to `create_app`.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Protocol

from app.settings import Settings

if TYPE_CHECKING:
    from celery import Celery


class Broker(Protocol):
    def enqueue(self, job_id: str) -> None:
        """Send the job's task; raises `broker_error()` when the broker cannot be reached."""

    def ping(self, timeout: float) -> None:
        """Return when the broker answers within `timeout` seconds; raise otherwise."""


class CeleryBroker:
    def __init__(self, settings: Settings):
        self._settings = settings
        self._app: Celery | None = None
        self._lock = threading.Lock()

    def _celery(self) -> Celery:
        with self._lock:
            if self._app is None:
                from workers.celery_app import create_app

                self._app = create_app(self._settings)
            return self._app

    def enqueue(self, job_id: str) -> None:
        from workers.celery_app import enqueue_job

        enqueue_job(job_id, app=self._celery())

    def ping(self, timeout: float) -> None:
        from workers.celery_app import broker_ping

        broker_ping(timeout, app=self._celery())


def broker_error() -> type[Exception]:
    """The exception `enqueue` raises when the broker is down (answered 503)."""
    from workers.celery_app import BrokerUnavailable

    return BrokerUnavailable
