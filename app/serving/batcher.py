"""The engine's compute thread: the only thread that runs torch, and how it batches requests.

Two policies share the thread:
- `Batcher` (static): takes the first waiting group of requests, waits up to `max_wait_s` for
  more (up to `max_batch_size`), and runs them as one batch to its end; requests that arrive
  while a batch runs join the next one.
- `ContinuousBatcher`: requests join the running batch at the next decoding step and leave it
  when done. A new group's prompts are prefilled a chunk at a time (`prefill_tokens` per step),
  between decoding steps, so a long prompt stalls running streams for one chunk at most.
In both, a group (the arms of one A/B request) starts together unless it alone exceeds the
maximum, and requests cancelled while waiting are skipped.

Every other piece of torch work of the serving process (building a version's weights, judging)
is handed to this thread with `call()`. Why: each thread that runs torch gets its own OpenMP
team, and once the teams hold more threads than there are cores, OpenMP stops its workers from
spinning between operations. On a small CPU, one idle extra team made decoding ~40% slower.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

from app.serving.decoding import Cohort, Decoder, GenRequest, Prefill
from app.serving.errors import EngineClosedError
from app.serving.sampling import Failed

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class _Call:
    fn: Callable[[], Any]
    future: Future = field(default_factory=Future)

    def run(self) -> None:
        if not self.future.set_running_or_notify_cancel():
            return
        try:
            self.future.set_result(self.fn())
        except BaseException as exc:  # delivered to the caller, who raises it
            self.future.set_exception(exc)


_Item = list[GenRequest] | _Call | None


class _ComputeThread:
    """The thread, its queue of request groups and calls, and closing; a policy runs `_loop`."""

    def __init__(self, *, max_batch_size: int, max_wait_s: float):
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self._queue: queue.Queue[_Item] = queue.Queue()
        self._held: list[GenRequest] | None = None  # a group that did not fit
        self._closed = False
        self.batch_sizes: list[int] = []  # requests started together, per start (tests, metrics)
        self.cancelled = 0  # requests that left early: their client went away
        self._thread = threading.Thread(target=self._run_loop, name="detox-compute", daemon=True)
        self._thread.start()

    def submit(self, *requests: GenRequest) -> None:
        """Queue requests as one group: they start together."""
        self._check_open()
        self._queue.put(list(requests))

    def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the compute thread (between batches or steps) and return its result."""
        if threading.current_thread() is self._thread:
            return fn()
        self._check_open()
        item = _Call(fn)
        self._queue.put(item)
        return item.future.result()

    def close(self, timeout: float = 30.0) -> None:
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout)

    def _check_open(self) -> None:
        if self._closed:
            raise EngineClosedError("the serving engine is shut down")

    def _run_loop(self) -> None:
        self._loop()
        self._fail_leftovers()

    def _loop(self) -> None:
        raise NotImplementedError

    def _fill(
        self, batch: list[GenRequest], wait: bool, limit: int | None = None
    ) -> tuple[list[GenRequest], bool]:
        """Add the queued groups that fit within `limit` requests (default: the maximum),
        waiting up to `max_wait_s` for more when `wait`; (batch, whether close was asked).
        Calls that arrive meanwhile run at once."""
        limit = self.max_batch_size if limit is None else limit
        deadline = time.monotonic() + (self.max_wait_s if wait else 0.0)
        while len(batch) < limit:
            remaining = max(0.0, deadline - time.monotonic())
            try:
                item = self._queue.get(timeout=remaining) if remaining else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                return batch, True
            if isinstance(item, _Call):  # e.g. a version load: it does not wait for the batch
                item.run()
            elif len(batch) + len(item) > limit:
                self._held = item
                break
            else:
                batch.extend(item)
        return batch, False

    def _next_group(self, block: bool) -> _Item | list[GenRequest]:
        """The held group, else the next queue item ([] when not blocking and none is there)."""
        if self._held is not None:
            held, self._held = self._held, None
            return held
        try:
            return self._queue.get() if block else self._queue.get_nowait()
        except queue.Empty:
            return []

    def _fail_leftovers(self) -> None:
        closed = EngineClosedError("the serving engine is shut down")
        leftover: list[_Item] = [self._held] if self._held else []
        while not self._queue.empty():
            leftover.append(self._queue.get_nowait())
        for item in leftover:
            if isinstance(item, _Call):
                item.future.set_exception(closed)
            for request in item if isinstance(item, list) else []:
                request.on_event(Failed(closed))


def _live(requests: list[GenRequest]) -> list[GenRequest]:
    return [r for r in requests if not r.cancelled.is_set()]


class Batcher(_ComputeThread):
    """Static batching: a batch runs to its end before the next one starts; `run` decodes one
    and may return how many of its requests were cancelled on the way."""

    def __init__(
        self,
        run: Callable[[list[GenRequest]], int | None],
        *,
        max_batch_size: int,
        max_wait_s: float,
    ):
        self._run = run
        super().__init__(max_batch_size=max_batch_size, max_wait_s=max_wait_s)

    def _loop(self) -> None:
        while True:
            first = self._next_group(block=True)
            if first is None:
                return
            if isinstance(first, _Call):
                first.run()
                continue
            batch, stop = self._fill(list(first), wait=True)
            self._run_one(_live(batch))
            if stop:
                return

    def _run_one(self, batch: list[GenRequest]) -> None:
        if not batch:
            return
        self.batch_sizes.append(len(batch))
        try:
            self.cancelled += self._run(batch) or 0
        except Exception as exc:  # run_batch reports its own errors; this is a last resort
            log.exception("batch failed")
            for request in batch:
                request.on_event(Failed(exc))


class ContinuousBatcher(_ComputeThread):
    """Continuous batching: every loop admits what fits, runs one prefill chunk and one decoding
    step of the running rows (one cohort, or several when the model's cache cannot be padded)."""

    def __init__(
        self,
        decoder: Decoder,
        *,
        max_batch_size: int,
        max_wait_s: float,
        prefill_tokens: int,
    ):
        self._decoder = decoder
        self.prefill_tokens = prefill_tokens
        self._prefills: deque[Prefill] = deque()
        self._cohorts: list[Cohort] = []
        super().__init__(max_batch_size=max_batch_size, max_wait_s=max_wait_s)

    def _loop(self) -> None:
        closing = False
        while not closing or self._busy() or self._held is not None:
            closing = self._admit(closing) or closing
            self._prefill_chunk()
            self._step()

    def _busy(self) -> bool:
        return bool(self._prefills or self._cohorts)

    def _rows(self) -> int:
        return sum(len(p.rows) for p in self._prefills) + sum(len(c) for c in self._cohorts)

    def _admit(self, closing: bool) -> bool:
        """Start a prefill of the queued groups that fit (waiting for more when idle); True
        when close was asked. Once closing, only a group already held is admitted."""
        idle = not self._busy()
        if closing:
            first, self._held = self._held or [], None
        else:
            first = self._next_group(block=idle)
        if first is None:
            return True
        if isinstance(first, _Call):
            first.run()
            return False
        room = self.max_batch_size - self._rows()
        if not first or (len(first) > room and not idle):
            self._held = first or None  # it waits for rows to leave
            return False
        batch, close_asked = (first, False) if closing else self._fill(
            list(first), wait=idle, limit=max(room, len(first))
        )  # fmt: skip
        batch = _live(batch)
        if batch:
            self.batch_sizes.append(len(batch))
            self._prefills.append(Prefill(self._decoder, batch))
        return close_asked

    def _prefill_chunk(self) -> None:
        if not self._prefills:
            return
        prefill = self._prefills[0]
        try:
            prefill.run(self.prefill_tokens)
            if not prefill.done:
                return
            self._prefills.popleft()
            cohort, cancelled = prefill.cohort()
        except Exception as exc:
            log.exception("prefill failed")
            self._prefills.popleft()
            prefill.fail(exc)
            return
        self.cancelled += cancelled
        if len(cohort) and not (self._cohorts and self._cohorts[-1].absorb(cohort)):
            self._cohorts.append(cohort)

    def _step(self) -> None:
        for cohort in self._cohorts:
            try:
                self.cancelled += cohort.step()
            except Exception as exc:
                log.exception("generation failed")
                cohort.fail(exc)
        self._cohorts = [c for c in self._cohorts if len(c)]
