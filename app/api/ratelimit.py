"""Per-key request rate limits: a generic cell rate algorithm (GCRA), i.e. a token bucket that
holds `burst` requests and refills at `per_minute`.

With Redis (the broker of a production deployment) the state lives there, shared by every API
process, updated by one Lua script so that check-and-update is atomic. Without it (the embedded
default) it lives in the process. If Redis stops answering, the limiter falls back to the
in-process state for a while instead of failing requests: a limit is a protection, not a
dependency.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Protocol

import redis

log = logging.getLogger(__name__)

REDIS_TIMEOUT_S = 0.25
REDIS_RETRY_AFTER_S = 5.0  # after a Redis failure, use the local state this long
_PREFIX = "detox:ratelimit:"

# KEYS[1]: the bucket; ARGV: interval (µs per request), tolerance (µs).
# Returns 0 when allowed, else the µs to wait.
_GCRA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval, tolerance = tonumber(ARGV[1]), tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + interval
local wait = new_tat - now - tolerance
if wait > 0 then return wait end
redis.call('SET', KEYS[1], new_tat, 'PX', math.ceil((new_tat - now) / 1000) + 1000)
return 0
"""


class RateLimiter(Protocol):
    def acquire(self, key: str) -> float:
        """0.0 when `key` may make a request now (and it is counted), else seconds to wait."""


class NoLimit:
    def acquire(self, key: str) -> float:
        return 0.0


class LocalLimiter:
    """GCRA state in this process."""

    def __init__(self, per_minute: int, burst: int):
        self.interval = 60.0 / per_minute
        self.tolerance = self.interval * burst
        self._tat: dict[str, float] = {}
        self._lock = threading.Lock()

    def acquire(self, key: str) -> float:
        now = time.monotonic()
        with self._lock:
            new_tat = max(self._tat.get(key, now), now) + self.interval
            wait = new_tat - now - self.tolerance
            if wait > 0:
                return wait
            self._tat[key] = new_tat
            if len(self._tat) > 100_000:  # keys idle for a full bucket's time carry no state
                self._tat = {k: t for k, t in self._tat.items() if t > now}
            return 0.0


class RedisLimiter:
    """GCRA state in Redis, shared by every API process; local state while Redis is away."""

    def __init__(self, url: str, per_minute: int, burst: int):
        self._local = LocalLimiter(per_minute, burst)
        self._interval_us = int(self._local.interval * 1e6)
        self._tolerance_us = int(self._local.tolerance * 1e6)
        client = redis.Redis.from_url(
            url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S
        )
        self._script = client.register_script(_GCRA)
        self._down_until = 0.0

    def acquire(self, key: str) -> float:
        if time.monotonic() >= self._down_until:
            try:
                wait_us = self._script(
                    keys=[_PREFIX + key], args=[self._interval_us, self._tolerance_us]
                )
                return int(wait_us) / 1e6
            except redis.RedisError as exc:
                log.warning("rate limits: Redis unavailable (%s); limiting in-process", exc)
                self._down_until = time.monotonic() + REDIS_RETRY_AFTER_S
        return self._local.acquire(key)


def make_limiter(per_minute: int, burst: int, redis_url: str | None) -> RateLimiter:
    if per_minute <= 0:
        return NoLimit()
    if redis_url is not None:
        return RedisLimiter(redis_url, per_minute, burst)
    return LocalLimiter(per_minute, burst)
