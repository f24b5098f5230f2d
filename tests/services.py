"""Where the test suite finds its services. `DETOX_TEST_REDIS` (default redis://127.0.0.1:6379)
lets two suites run side by side, each on its own Redis server; PostgreSQL needs no such switch
(every suite makes its own databases)."""

from __future__ import annotations

import os

REDIS_BASE = os.environ.get("DETOX_TEST_REDIS", "redis://127.0.0.1:6379").rstrip("/")


def redis_url(db: int) -> str:
    """The URL of Redis database `db` on the test suite's Redis server."""
    return f"{REDIS_BASE}/{db}"


# The test suite's bootstrap admin key (DETOX_ADMIN_KEY), also the CLI clients' key
# (DETOX_API_KEY): tests/conftest.py puts both in the environment, so in-process settings and
# the servers the tests start accept it.
ADMIN_KEY = "dtx_test-suite-admin-key"
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
