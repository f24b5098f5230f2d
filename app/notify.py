"""Version changes announced over Redis pub/sub, so serving engines pick up a new or retired
version at once in production. Best effort by design: the engines also poll the store
(`serving_poll_s`), which is all the embedded default (no Redis) has, and which covers any
message lost while Redis was away.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import redis

CHANNEL = "detox:versions"
# How long the listener blocks on Redis before it looks at its stop flag: what `stop()` (every
# engine close, so every API shutdown) waits, ~half of it on average. 20 idle wake-ups a second
# cost nothing measurable; at 0.5 s, closing an engine took ~0.5 s.
LISTEN_TIMEOUT_S = 0.05
log = logging.getLogger(__name__)


def is_redis(url: str | None) -> bool:
    return bool(url) and url.startswith(("redis://", "rediss://"))


def publish_versions_changed(url: str | None, *, timeout: float = 1.0) -> bool:
    """Announce that versions changed; False when there is no Redis or it did not answer."""
    if not is_redis(url):
        return False
    client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    try:
        client.publish(CHANNEL, "changed")
        return True
    except redis.RedisError as exc:
        log.warning("could not announce a version change (%s); engines will poll", exc)
        return False
    finally:
        client.close()


class VersionSubscriber:
    """A daemon thread that calls `on_change()` for every announcement, reconnecting as needed."""

    def __init__(self, url: str, on_change: Callable[[], None], *, retry_s: float = 2.0):
        self._url = url
        self._on_change = on_change
        self._retry_s = retry_s
        self._stop = threading.Event()
        self.subscribed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="detox-notify", daemon=True)

    def start(self) -> VersionSubscriber:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._listen()
            except redis.RedisError as exc:
                self.subscribed.clear()
                log.warning("version notifications interrupted (%s); retrying", exc)
                self._stop.wait(self._retry_s)

    def _listen(self) -> None:
        client = redis.Redis.from_url(self._url, socket_timeout=None, socket_connect_timeout=2)
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(CHANNEL)
            self.subscribed.set()
            while not self._stop.is_set():
                if pubsub.get_message(timeout=LISTEN_TIMEOUT_S) is not None:
                    try:
                        self._on_change()
                    except Exception:
                        log.warning("refresh after a version change failed", exc_info=True)
        finally:
            pubsub.close()
            client.close()
