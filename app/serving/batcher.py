"""Dynamic batching: requests that arrive while a batch runs join the next one.

One background thread takes the first waiting group of requests, waits up to `max_wait_s` for more
(up to `max_batch_size`), and runs them as one batch. A group (the arms of one A/B request) is
never split across batches unless it alone exceeds the maximum. Requests cancelled while waiting
are skipped.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

from app.serving.decoding import GenRequest
from app.serving.errors import EngineClosedError
from app.serving.sampling import Failed

log = logging.getLogger(__name__)


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
        self._queue: queue.Queue[list[GenRequest] | None] = queue.Queue()
        self._held: list[GenRequest] | None = None  # a group that did not fit the last batch
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="detox-batcher", daemon=True)
        self._thread.start()
        self.batch_sizes: list[int] = []  # sizes of the batches run so far (tests, metrics)

    def submit(self, *requests: GenRequest) -> None:
        """Queue requests as one group: they run in the same batch."""
        if self._closed:
            raise EngineClosedError("the serving engine is shut down")
        self._queue.put(list(requests))

    def close(self, timeout: float = 30.0) -> None:
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            first = self._held if self._held is not None else self._queue.get()
            self._held = None
            if first is None:
                break
            batch = list(first)
            deadline = time.monotonic() + self.max_wait_s
            stop = False
            while len(batch) < self.max_batch_size:
                remaining = deadline - time.monotonic()
                try:
                    if remaining > 0:
                        group = self._queue.get(timeout=remaining)
                    else:
                        group = self._queue.get_nowait()
                except queue.Empty:
                    break
                if group is None:
                    stop = True
                    break
                if len(batch) + len(group) > self.max_batch_size:
                    self._held = group
                    break
                batch.extend(group)
            self._run_one([r for r in batch if not r.cancelled.is_set()])
            if stop:
                break
        leftover = [self._held] if self._held else []
        while not self._queue.empty():
            leftover.append(self._queue.get_nowait())
        for group in leftover:  # fail whatever still waits
            for request in group or []:
                request.on_event(Failed(EngineClosedError("the serving engine is shut down")))

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
