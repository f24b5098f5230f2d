"""The compute thread: batches requests, and runs every other torch call of the engine itself."""

from __future__ import annotations

import threading
import time

import pytest

from app.serving.batcher import Batcher
from app.serving.decoding import GenRequest
from app.serving.errors import EngineClosedError
from app.serving.sampling import SamplingParams


def request(events: list) -> GenRequest:
    return GenRequest([1, 2], None, SamplingParams(max_tokens=1), events.append)


def test_call_runs_on_the_compute_thread_and_returns_or_raises():
    ran_on: list[str] = []
    batcher = Batcher(lambda batch: ran_on.append(threading.current_thread().name),
                      max_batch_size=4, max_wait_s=0.0)  # fmt: skip
    try:
        assert batcher.call(lambda: threading.current_thread().name) == "detox-compute"
        with pytest.raises(ZeroDivisionError):
            batcher.call(lambda: 1 / 0)
        batcher.submit(request([]))
        assert batcher.call(lambda: 7) == 7  # queued after the batch: the batch ran first
        assert ran_on == ["detox-compute"]
        assert batcher.call(lambda: batcher.call(lambda: 3)) == 3  # no deadlock from inside
    finally:
        batcher.close()
    with pytest.raises(EngineClosedError):
        batcher.call(lambda: 1)


def test_a_call_arriving_while_a_batch_fills_does_not_wait_for_the_batch():
    ran = threading.Event()
    batches: list[int] = []

    def run(batch):
        batches.append(len(batch))
        ran.set()

    # The batch waits (for all practical purposes forever) for its 3 other requests, and they are
    # sent only once the call has returned: a call that waited for the batch would never return.
    batcher = Batcher(run, max_batch_size=4, max_wait_s=3600.0)
    try:
        batcher.submit(request([]))  # queued first: the compute thread is filling its batch
        seen: list[list[int]] = []
        returned = threading.Event()

        def caller():
            batcher.call(lambda: seen.append(list(batches)))
            returned.set()

        threading.Thread(target=caller, daemon=True).start()
        assert returned.wait(60), "the call waited for the filling batch"
        assert seen == [[]]  # it ran before any batch
        for _ in range(3):
            batcher.submit(request([]))
        assert ran.wait(60), "the full batch never ran"
        assert batches == [4]  # the call did not end the filling: one full batch
    finally:
        batcher.close()


def test_close_serves_what_was_queued_then_refuses_more():
    gate = threading.Event()
    served: list[int] = []

    def run(batch):
        gate.wait(5)
        served.append(len(batch))

    batcher = Batcher(run, max_batch_size=1, max_wait_s=0.0)
    batcher.submit(request([]))  # occupies the thread until the gate opens
    time.sleep(0.1)
    batcher.submit(request([]))
    closer = threading.Thread(target=batcher.close)
    closer.start()
    time.sleep(0.1)
    with pytest.raises(EngineClosedError):
        batcher.submit(request([]))
    gate.set()
    closer.join(10)
    assert served == [1, 1]
