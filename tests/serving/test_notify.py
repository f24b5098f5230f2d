"""Version changes over Redis pub/sub (real Redis): an engine that does not poll still sees a new
version at once, and a retired one leaves."""

from __future__ import annotations

import time

from app.notify import VersionSubscriber, publish_versions_changed
from app.serving.engine import Engine
from app.serving.factory import StoreVersionSource, version_events
from app.store import crud
from tests.factories import tiny_model
from tests.services import redis_url
from tests.serving.conftest import random_delta, store_version

REDIS_URL = redis_url(9)


def _eventually(predicate, timeout: float = 60.0) -> bool:
    """Whether `predicate` comes true before `timeout`: a guard against hanging, far above the time
    a notification takes (the engine below polls only once an hour)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_no_redis_means_no_announcement():
    assert publish_versions_changed(None) is False
    assert publish_versions_changed("filesystem://") is False


def test_subscriber_hears_an_announcement():
    calls = []
    subscriber = VersionSubscriber(REDIS_URL, lambda: calls.append(1)).start()
    try:
        assert subscriber.subscribed.wait(5)
        assert publish_versions_changed(REDIS_URL)
        assert _eventually(lambda: calls)
    finally:
        subscriber.stop()


def test_engine_sees_new_and_retired_versions_without_polling(sessions):
    lm = tiny_model("llama")
    engine = Engine(
        lm, StoreVersionSource(sessions), poll_s=3600.0, version_events=version_events(REDIS_URL)
    )
    engine.start_polling()
    try:
        assert engine.live._subscription is not None and engine.live._subscription.subscribed.wait(
            5
        )
        store_version(sessions, lm, random_delta(lm, layer=1, seed=1), name="n1")
        assert [v.name for v in engine.versions()] == []  # polling alone would wait an hour
        publish_versions_changed(REDIS_URL)
        assert _eventually(lambda: [v.name for v in engine.versions()] == ["n1"])
        with sessions() as session:
            crud.retire_version(session=session, name="n1")
        publish_versions_changed(REDIS_URL)
        assert _eventually(lambda: engine.versions() == [])
    finally:
        engine.close()
