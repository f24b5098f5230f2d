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
    started = threading.Event()
    batches: list[int] = []
    batcher = Batcher(lambda batch: batches.append(len(batch)), max_batch_size=4, max_wait_s=5.0)
    try:
        batcher.submit(request([]))  # the batch now waits up to 5 s for more requests
        time.sleep(0.1)
        t0 = time.monotonic()
        batcher.call(started.set)
        assert started.is_set() and time.monotonic() - t0 < 2.0
        for _ in range(3):
            batcher.submit(request([]))
        deadline = time.monotonic() + 5
        while not batches:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert batches == [4]
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
