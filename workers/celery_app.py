"""The Celery app, its queues, and the two calls the API makes: `enqueue_job` and `broker_ping`.

Importing this module must stay cheap and torch-free: the API process imports it. Task code lives
in `workers.tasks`, which only the worker process imports. Celery stores no results here: the
database is the source of truth for a job's state (`task_ignore_result`).

Broker: `redis://...` in production; in the embedded default kombu's `filesystem://` transport
under `DETOX_HOME`, which needs no server. Each has our own channel: `workers.filesystem_broker`
(kombu's lets a consumer read a message before it is written) and `workers.redis_broker` (an
undecodable message is skipped, not fatal). The filesystem transport removes a message when it
is received, so acks_late cannot redeliver a killed worker's task there: the stale-job reaper of
`workers.main` requeues it instead (and covers Redis too, whose redelivery waits for the
visibility timeout).
"""

from __future__ import annotations

import os
from enum import StrEnum
from functools import lru_cache
from typing import Any

from celery import Celery
from kombu.exceptions import KombuError
from kombu.utils.url import maybe_sanitize_url

from app.settings import Settings, get_settings

RUN_JOB = "detox.run_job"  # the task's name: callers send it by name, never import it
FILESYSTEM_TRANSPORT = "workers.filesystem_broker:Transport"
REDIS_TRANSPORT = "workers.redis_broker:Transport"
FILESYSTEM_POLL_S = 0.1  # the filesystem transport polls its folder; kombu's default is 1 s
REDIS_SOCKET_TIMEOUT_S = 5.0


class Queue(StrEnum):
    """Queues, split by workload: a GPU worker consumes both, a CPU-only helper only LIGHT."""

    EDITS = "edits"  # edit jobs: hold the GPU for seconds to minutes
    LIGHT = "light"  # short bookkeeping tasks


class BrokerUnavailable(RuntimeError):
    """The broker could not be reached quickly; the job was not enqueued (the API answers 503)."""


def create_app(settings: Settings) -> Celery:
    """A Celery app configured from `settings` (creating the filesystem broker's folders)."""
    url = settings.resolved_broker_url()
    if url == "filesystem://":
        url = "filesystem://localhost//"  # the same, without kombu's "no hostname" warning
    app = Celery("detox", broker=url, set_as_current=False)
    app.conf.update(
        task_ignore_result=True,
        result_backend=None,
        # Redelivery when a worker dies mid-task; one task at a time per worker (GPU-bound).
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_soft_time_limit=settings.job_soft_time_limit_s,
        task_time_limit=settings.job_time_limit_s,
        task_default_queue=Queue.LIGHT.value,
        task_routes={RUN_JOB: {"queue": Queue.EDITS.value}},
        task_serializer="json",
        accept_content=["json"],
        broker_transport=_transport(url),
        broker_transport_options=_transport_options(settings, url),
        broker_connection_timeout=settings.broker_connect_timeout_s,
        broker_connection_retry_on_startup=True,  # a worker waits for the broker to come up
        # Publishing fails fast instead of retrying: the API turns the error into a 503.
        task_publish_retry=False,
        worker_hijack_root_logger=False,
        # The filesystem transport has no broadcast; job state lives in the DB anyway.
        worker_enable_remote_control=url.startswith(("redis", "rediss")),
        worker_send_task_events=False,
    )
    return app


def _transport(url: str) -> str | None:
    """Our subclass of kombu's transport for `url`, where we have one (see their modules)."""
    if url.startswith("filesystem"):
        return FILESYSTEM_TRANSPORT
    if url.startswith(("redis://", "rediss://")):
        return REDIS_TRANSPORT
    return None


def _transport_options(settings: Settings, url: str) -> dict[str, Any]:
    if url.startswith("filesystem"):
        folders = {name: str(path) for name, path in settings.broker_folders().items()}
        return {**folders, "polling_interval": FILESYSTEM_POLL_S}
    if url.startswith(("redis", "rediss")):
        return {
            "visibility_timeout": settings.broker_visibility_timeout_s,
            "socket_connect_timeout": settings.broker_connect_timeout_s,
            # A Redis that accepts but never answers must not hang the API (the worker's
            # BRPOP waits 1 s at a time, well below this).
            "socket_timeout": REDIS_SOCKET_TIMEOUT_S,
            # Never block a publish on connection retries: fail and let the caller decide.
            "max_retries": 0,
        }
    return {}


@lru_cache(maxsize=1)
def get_app() -> Celery:
    """The app of this process's settings (`get_settings()`), built on first use."""
    return create_app(get_settings())


def enqueue_job(job_id: str, *, app: Celery | None = None) -> None:
    """Send the job's task (by name, with the job id only) to the edits queue.

    Raises BrokerUnavailable when the broker cannot be reached within the connect timeout.
    """
    app = app or get_app()
    try:
        app.send_task(RUN_JOB, args=[job_id], queue=Queue.EDITS.value, retry=False)
    except (KombuError, OSError) as exc:
        raise BrokerUnavailable(_unreachable(app, exc)) from exc


def broker_ping(timeout: float = 2.0, *, app: Celery | None = None) -> None:
    """Return when the broker answers within `timeout` seconds; raise BrokerUnavailable if not."""
    app = app or get_app()
    try:
        # Redis socket timeouts of `timeout`, so a server that accepts but never answers fails too.
        limits = {"socket_connect_timeout": timeout, "socket_timeout": timeout}
        with app.connection_for_write(transport_options=limits) as connection:
            connection.ensure_connection(max_retries=1, interval_start=0, timeout=timeout)
            channel = connection.default_channel
            client = getattr(channel, "client", None)
            if client is not None and hasattr(client, "ping"):
                client.ping()  # Redis: a round trip, not just an open socket
            folder = app.conf.broker_transport_options.get("data_folder_out")
            if folder is not None and not os.access(folder, os.W_OK):
                raise BrokerUnavailable(f"the job queue folder {folder} is not writable")
    except (KombuError, OSError) as exc:
        raise BrokerUnavailable(_unreachable(app, exc)) from exc


def _unreachable(app: Celery, exc: BaseException) -> str:
    url = maybe_sanitize_url(app.conf.broker_url or "")
    return f"the job broker at {url} is not reachable: {exc or type(exc).__name__}"
