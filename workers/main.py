"""The worker process: one per GPU, solo pool, concurrency 1, plus the stale-job reaper.

`run_worker` loads the base model and judge before consuming (the first job doesn't pay for
them), starts the reaper thread, then runs a Celery worker in this process until it is told to
stop (SIGTERM or Ctrl-C: warm shutdown, the current job finishes first; twice: at once).

The reaper is what makes recovery work on every broker: a job whose worker vanished keeps a
`running` row with an ageing heartbeat; every `heartbeat timeout / 4` (and at start) the reaper
sends such jobs back to `queued` and enqueues them again (or fails them at the attempt cap, or
cancels them when a cancel was requested). With Redis the broker may also redeliver the original
task later; the claim makes the duplicate a no-op ("skipped").
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from datetime import timedelta

from sqlalchemy.orm import Session, sessionmaker

from app.logs import configure_logging
from app.settings import Settings, get_settings
from app.store import crud
from workers import tasks
from workers.celery_app import BrokerUnavailable, Queue, create_app, enqueue_job

log = logging.getLogger(__name__)


class StaleJobReaper:
    """A daemon thread that requeues jobs whose heartbeat is older than the stale bound."""

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        settings: Settings,
        enqueue: Callable[[str], None],
    ):
        self._sessions = session_factory
        self._older_than = timedelta(seconds=settings.job_heartbeat_timeout_s)
        self._max_attempts = settings.job_max_attempts
        self._interval_s = settings.job_heartbeat_timeout_s / 4
        self._enqueue = enqueue
        self._unsent: list[str] = []  # requeued, but the broker was down: try again next round
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="stale-job-reaper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def sweep(self) -> list[str]:
        """One round: requeue stale jobs and enqueue them; returns the ids enqueued."""
        with self._sessions() as session:
            requeued = crud.requeue_stale_jobs(
                session=session, older_than=self._older_than, max_attempts=self._max_attempts
            )
        if requeued:
            log.warning("requeued stale jobs: %s", ", ".join(requeued))
        pending, self._unsent = [*self._unsent, *requeued], []
        sent = []
        for job_id in pending:
            try:
                self._enqueue(job_id)
                sent.append(job_id)
            except BrokerUnavailable as exc:
                log.warning("job %s: requeued but not enqueued yet (%s)", job_id, exc)
                self._unsent.append(job_id)
        return sent

    def _loop(self) -> None:
        while True:
            try:
                self.sweep()
            except Exception:  # the database may be down: try again next round
                log.exception("stale-job sweep failed")
            if self._stop.wait(self._interval_s):
                return


def run_worker(
    settings: Settings | None = None,
    *,
    queues: Sequence[Queue] = (Queue.EDITS, Queue.LIGHT),
    loglevel: str | None = None,
) -> int:
    """Run a worker in this process until it is stopped; returns its exit code."""
    settings = settings or get_settings()
    loglevel = loglevel or settings.log_level
    configure_logging(settings.log_format, loglevel)
    app = create_app(settings)
    context = tasks.build_context(settings)
    tasks.install_context(context)
    start = time.perf_counter()
    context.runtime.preload()
    log.info(
        "worker %s ready: model %s loaded in %.1f s; queues %s",
        context.name,
        context.runtime.model_name,
        time.perf_counter() - start,
        ", ".join(q.value for q in queues),
    )
    reaper = StaleJobReaper(
        context.session_factory, settings, lambda job_id: enqueue_job(job_id, app=app)
    )
    reaper.start()
    try:
        worker = app.Worker(
            hostname=context.name,
            pool="solo",
            concurrency=1,
            queues=[q.value for q in queues],
            loglevel=loglevel,
            # Job state, liveness and recovery live in the database: no gossip, mingle or events.
            without_gossip=True,
            without_mingle=True,
            without_heartbeat=True,
            optimization="fair",
            redirect_stdouts=False,
            quiet=True,  # no startup banner: the log is records only (see the "ready" line)
        )
        worker.start()
        return int(worker.exitcode or 0)
    finally:
        reaper.stop()
