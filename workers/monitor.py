"""A running job's link to its row: stage and progress, cancellation, heartbeat, time limit.

The edit calls `progress` and `should_cancel` from the job's thread; both are throttled, so a
fast loop does not turn into a stream of database writes. A separate heartbeat thread bumps the
row every few seconds, because one evaluation stage can outlast the stale bound on a big model.
Every write is fenced to this claim's attempt: when it changes nothing, a newer claim has taken
the job over, and the edit stops without writing anything more ("superseded").

Progress writes and cancel checks are best-effort: a database blip must not throw away an edit
that is nearly done. Only the final write (the version) has to succeed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Literal

from sqlalchemy.orm import Session, sessionmaker

from app.ml.errors import EditCancelled
from app.store import crud
from workers.errors import TRANSIENT_ERRORS

log = logging.getLogger(__name__)

StopReason = Literal["cancel", "superseded", "timeout"]

# Where each stage of `dinm_with_report` (evaluate, locate, [prepare,] tune, evaluate; a joint
# edit prepares its sets) and of `unlearn_with_report` (evaluate, prepare, unlearn, evaluate) lies
# in the job's overall progress (0..1). An eval job's suites split it evenly (`suite_spans`).
STAGE_SPANS: dict[str, tuple[float, float]] = {
    "eval-before": (0.0, 0.25),
    "locate": (0.25, 0.26),
    "prepare": (0.26, 0.3),
    "tune": (0.3, 0.75),
    "unlearn": (0.3, 0.75),
    "eval-after": (0.75, 1.0),
}


def suite_spans(suites: list[str]) -> dict[str, tuple[float, float]]:
    """An eval job's stages ("eval-<suite>", in order), each an equal share of its progress."""
    n = len(suites)
    return {f"eval-{suite}": (i / n, (i + 1) / n) for i, suite in enumerate(suites)}


class JobMonitor:
    """Use as a context manager around the edit: the heartbeat thread runs inside it."""

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        job_id: str,
        attempt: int,
        *,
        heartbeat_s: float,
        time_limit_s: float,
        progress_every_s: float = 0.5,
        cancel_every_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._sessions = session_factory
        self.job_id, self.attempt = job_id, attempt
        self._heartbeat_s = heartbeat_s
        self._progress_every_s, self._cancel_every_s = progress_every_s, cancel_every_s
        self._clock = clock
        self._deadline = clock() + time_limit_s
        self._stage: str | None = None
        self._spans = STAGE_SPANS
        self._overall = 0.0
        self._last_write = self._last_cancel_check = float("-inf")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.stop_reason: StopReason | None = None

    def __enter__(self) -> JobMonitor:
        self._thread = threading.Thread(
            target=self._beat, name=f"heartbeat-{self.job_id[:8]}", daemon=True
        )
        self._thread.start()
        return self

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _exc: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def use_spans(self, spans: dict[str, tuple[float, float]]) -> None:
        """Where this job's stages lie in its progress (default: `STAGE_SPANS`)."""
        self._spans = spans

    def progress(self, stage: str, fraction: float) -> None:
        """The edit's progress callback; raises EditCancelled when the job must stop."""
        start, end = self._spans.get(stage, (self._overall, self._overall))
        self._overall = max(self._overall, start + (end - start) * min(1.0, max(0.0, fraction)))
        now = self._clock()
        if stage != self._stage or now - self._last_write >= self._progress_every_s:
            self._stage, self._last_write = stage, now
            self._write(stage, self._overall)
        if self.should_cancel():
            raise EditCancelled(f"stopped during {stage}: {self.stop_reason}")

    def set_stage(self, stage: str) -> None:
        """Record a stage of the worker's own (e.g. "materialise", "saving"), unthrottled."""
        self._stage, self._last_write = stage, self._clock()
        self._write(stage, self._overall)

    def should_cancel(self) -> bool:
        """The edit's cancel check: True once cancelled, superseded or past the time limit."""
        now = self._clock()
        if self.stop_reason is None and now > self._deadline:
            self.stop_reason = "timeout"
        if self.stop_reason is None and now - self._last_cancel_check >= self._cancel_every_s:
            self._last_cancel_check = now
            if self._cancel_requested():
                self.stop_reason = "cancel"
        return self.stop_reason is not None

    def cancel_requested_now(self) -> bool:
        """An unthrottled check, right before the result is written."""
        if self.stop_reason is None and self._cancel_requested():
            self.stop_reason = "cancel"
        return self.stop_reason is not None

    def _write(self, stage: str, progress: float) -> None:
        try:
            with self._sessions() as session:
                ours = crud.update_progress(
                    session=session,
                    job_id=self.job_id,
                    stage=stage,
                    progress=progress,
                    attempt=self.attempt,
                )
        except TRANSIENT_ERRORS as exc:
            log.warning("job %s: progress not recorded (%s)", self.job_id, exc)
            return
        if not ours:
            self._superseded()

    def _cancel_requested(self) -> bool:
        try:
            with self._sessions() as session:
                return crud.is_cancel_requested(session=session, job_id=self.job_id)
        except TRANSIENT_ERRORS as exc:
            log.warning("job %s: cancel check failed (%s)", self.job_id, exc)
            return False

    def _superseded(self) -> None:
        if self.stop_reason is None:
            log.warning("job %s: attempt %d was superseded; stopping", self.job_id, self.attempt)
            self.stop_reason = "superseded"

    def _beat(self) -> None:
        while not self._stop.wait(self._heartbeat_s):
            try:
                with self._sessions() as session:
                    ours = crud.heartbeat(session=session, job_id=self.job_id, attempt=self.attempt)
            except Exception as exc:  # keep beating: the next one may get through
                log.warning("job %s: heartbeat failed (%s)", self.job_id, exc)
                continue
            if not ours:  # finished by this attempt, or taken over: either way, stop beating
                if self.stop_reason is None and not self._stop.is_set():
                    log.info("job %s: attempt %d no longer running", self.job_id, self.attempt)
                    self.stop_reason = "superseded"
                return
