"""`detox migrate`: the one-shot migration step (the compose file's `migrate` service)."""

from __future__ import annotations

import subprocess
import sys

from app.store.migrate import current_revision, head_revision
from tests.cli.servers import ROOT, _env


def _migrate(**env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", "migrate"],
        cwd=ROOT,
        env=_env(**env),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_migrate_upgrades_to_head_and_is_idempotent(tmp_path):
    url = f"sqlite:///{tmp_path / 'detox.db'}"
    for _ in range(2):  # the second run finds the database at head and does nothing
        done = _migrate(DETOX_DATABASE_URL=url)
        assert done.returncode == 0, done.stderr
        assert f"database at revision {head_revision()}" in done.stderr
    assert current_revision(url) == head_revision()


def test_migrate_fails_when_the_database_is_unreachable(tmp_path):
    done = _migrate(DETOX_DATABASE_URL="postgresql+psycopg://detox@127.0.0.1:1/detox")
    assert done.returncode != 0
    assert "database at revision" not in done.stderr
