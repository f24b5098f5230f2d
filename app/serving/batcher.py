"""The engine's compute thread: dynamic batching, and the only thread that runs torch.

One background thread takes the first waiting group of requests, waits up to `max_wait_s` for more
(up to `max_batch_size`), and runs them as one batch; requests that arrive while a batch runs join
the next one. A group (the arms of one A/B request) is never split across batches unless it alone
exceeds the maximum. Requests cancelled while waiting are skipped.

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
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

from app.serving.decoding import GenRequest
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


class Batcher:
    def __init__(
        self,
        run: Callable[[list[GenRequest]], None],
        *,
        max_batch_size: int,
        max_wait_s: float,
    ):
        self._run = run
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self._queue: queue.Queue[_Item] = queue.Queue()
        self._held: list[GenRequest] | None = None  # a group that did not fit the last batch
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="detox-compute", daemon=True)
        self._thread.start()
        self.batch_sizes: list[int] = []  # sizes of the batches run so far (tests, metrics)

    def submit(self, *requests: GenRequest) -> None:
        """Queue requests as one group: they run in the same batch."""
        self._check_open()
        self._queue.put(list(requests))

    def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the compute thread (between batches) and return its result; blocks."""
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

    def _loop(self) -> None:
        while True:
            first = self._held if self._held is not None else self._queue.get()
            self._held = None
            if first is None:
                break
            if isinstance(first, _Call):
                first.run()
                continue
            batch, stop = self._fill(list(first))
            self._run_one([r for r in batch if not r.cancelled.is_set()])
            if stop:
                break
        self._fail_leftovers()

    def _fill(self, batch: list[GenRequest]) -> tuple[list[GenRequest], bool]:
        """Add the groups that arrive within the wait; (batch, whether close was asked)."""
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch_size:
            remaining = max(0.0, deadline - time.monotonic())
            try:
                item = self._queue.get(timeout=remaining) if remaining else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                return batch, True
            if isinstance(item, _Call):  # e.g. a version load: it does not wait for the batch
                item.run()
            elif len(batch) + len(item) > self.max_batch_size:
                self._held = item
                break
            else:
                batch.extend(item)
        return batch, False

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

    def _run_one(self, batch: list[GenRequest]) -> None:
        if not batch:
            return
        self.batch_sizes.append(len(batch))
        try:
            self._run(batch)
        except Exception as exc:  # run_batch reports its own errors; this is a last resort
            log.exception("batch failed")
            for request in batch:
                request.on_event(Failed(exc))
