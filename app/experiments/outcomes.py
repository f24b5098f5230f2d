"""Every response an experiment served, recorded and judged off the request path.

`OutcomeRecorder` is one background thread: it writes each served response's row, then judges
the batch it took and stores the verdicts. A judge that fails leaves the rows unjudged with the
reason; a database that fails is retried for `retry_s`. The caller only puts on a queue.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from app.experiments.routing import Assignment
from app.ml.judge_names import OFFLINE_SPECS
from app.serving.traffic import ServedResponse
from app.store import crud

if TYPE_CHECKING:
    from app.ml.judges import Judge, Verdict  # torch: the API imports it only once it generates
    from app.serving.engine_base import EngineBase as Engine

log = logging.getLogger(__name__)

# DETOX_JUDGE, an offline judge ("offline": the newest, stored as its versioned name), or none
JudgeName = Literal["service", "offline", "offline/1", "offline/2", "offline/3", "none"]
BATCH = 32

VerdictFn = Callable[[str, Sequence[str], Sequence[str]], "list[Verdict]"]


@dataclass(frozen=True)
class Served:
    """One response of an experiment, as the recorder queues it."""

    assignment: Assignment
    response: ServedResponse


def verdicts_via(engine: Callable[[], Engine]) -> VerdictFn:
    """Judging for the recorder: an offline judge here, on the recorder's thread (no torch),
    the version the experiment names ("offline/1", "offline/2", "offline/3"; "offline", stored
    before the versions, is the newest); "service" by the engine's configured judge
    (DETOX_JUDGE), on the engine's compute thread."""
    offline: dict[str, Judge] = {}

    def verdicts(judge: str, prompts: Sequence[str], texts: Sequence[str]) -> list[Verdict]:
        if judge in OFFLINE_SPECS:
            from app.ml.judges import load_judge

            if judge not in offline:
                offline[judge] = load_judge(judge)
            return offline[judge].judge(list(prompts), list(texts))
        return engine().verdicts(prompts, texts)[1]

    return verdicts


class OutcomeRecorder:
    def __init__(
        self,
        sessions: Any,
        verdicts: VerdictFn,
        *,
        max_queue: int = 10_000,
        retry_s: float = 30.0,
    ):
        self._sessions = sessions
        self._verdicts = verdicts
        self._retry_s = retry_s
        self._queue: queue.Queue[Served | None] = queue.Queue(max_queue)
        self._pending: set[str] = set()
        self._settled = threading.Condition()
        self.dropped = 0  # outcomes lost: the queue was full or the database stayed down
        self.recorded = 0
        self._thread = threading.Thread(target=self._loop, name="detox-outcomes", daemon=True)
        self._thread.start()

    def submit(self, assignment: Assignment, response: ServedResponse) -> None:
        """Queue a response for recording and judging (never blocks)."""
        if not assignment.recorded:
            return
        served = Served(assignment, response)
        with self._settled:
            self._pending.add(served.response.response_id)
        try:
            self._queue.put_nowait(served)
        except queue.Full:
            self._settle([served], dropped=True)
            log.error("experiment outcome queue full: dropped %s", served.response.response_id)

    def wait(self, response_id: str, timeout: float = 5.0) -> None:
        """Return once `response_id` is no longer queued (recorded, or given up on)."""
        deadline = time.monotonic() + timeout
        with self._settled:
            while response_id in self._pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._settled.wait(left)

    def close(self, timeout: float = 10.0) -> None:
        """Record what is queued (for up to `timeout`), then stop."""
        self._queue.put(None)
        self._thread.join(timeout)

    # -- the recording thread --------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            try:
                self._record(batch)
            except Exception:  # the thread must outlive any one batch
                log.exception("could not record %d experiment outcome(s)", len(batch))
                self._settle(batch, dropped=True)

    def _take(self) -> list[Served] | None:
        first = self._queue.get()
        if first is None:
            return None
        batch = [first]
        while len(batch) < BATCH:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self._queue.put(None)  # stop after this batch
                break
            batch.append(item)
        return batch

    def _record(self, batch: list[Served]) -> None:
        saved, lost = [], []
        for served in batch:
            (saved if self._retrying(lambda s=served: self._save(s)) else lost).append(served)
        self._settle(lost, dropped=True)
        self._settle(saved, dropped=False)  # feedback may refer to them from now on
        for judge in {s.assignment.experiment.judge for s in saved}:
            group = [s for s in saved if s.assignment.experiment.judge == judge]
            if judge != "none":
                self._judge(judge, group)

    def _save(self, served: Served) -> None:
        keep = served.assignment.experiment.keep_text
        with self._sessions() as session:
            crud.record_outcome(
                session=session,
                experiment_id=served.assignment.experiment.id,
                response_id=served.response.response_id,
                arm=served.assignment.model,
                user_hash=served.assignment.user_hash,
                latency_ms=served.response.latency_ms,
                prompt_tokens=served.response.prompt_tokens,
                completion_tokens=served.response.completion_tokens,
                finish_reason=served.response.finish_reason,
                prompt=served.response.prompt if keep else None,
                response=served.response.text if keep else None,
            )

    def _judge(self, judge: str, group: list[Served]) -> None:
        try:
            prompts, texts = [s.response.prompt for s in group], [s.response.text for s in group]
            verdicts = self._verdicts(judge, prompts, texts)
            results = [
                {"unsafe": v.unsafe, "unsafe_score": round(v.score, 4), "refused": v.refused}
                for v in verdicts
            ]
        except Exception as exc:
            log.warning("judge %r failed; %d outcome(s) stay unjudged: %s", judge, len(group), exc)
            results = [{"error": f"judge {judge!r} failed: {exc}"}] * len(group)
        for served, result in zip(group, results, strict=True):

            def store(served: Served = served, result: dict = result) -> None:
                with self._sessions() as session:
                    crud.judge_outcome(
                        session=session, response_id=served.response.response_id, **result
                    )

            self._retrying(store)

    def _retrying(self, write: Callable[[], None]) -> bool:
        """Run a store write, retrying while the database is unavailable, for `retry_s`."""
        deadline = time.monotonic() + self._retry_s
        delay = 0.1
        while True:
            try:
                write()
                return True
            except IntegrityError as exc:  # not the database's health: retrying cannot help
                log.error("could not write an experiment outcome: %s", exc)
                return False
            except SQLAlchemyError as exc:
                if time.monotonic() + delay > deadline:
                    log.error("gave up writing an experiment outcome: %s", exc)
                    return False
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    def _settle(self, batch: list[Served], *, dropped: bool) -> None:
        with self._settled:
            for served in batch:
                self._pending.discard(served.response.response_id)
            if dropped:
                self.dropped += len(batch)
            else:
                self.recorded += len(batch)
            self._settled.notify_all()
