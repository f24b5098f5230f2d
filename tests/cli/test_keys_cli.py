"""`detox keys create|list|revoke` against a live `detox api`, and the roles they hand out."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.cli.servers import detox, running_api


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_api(tmp_path_factory.mktemp("home")) as url:
        yield url


def test_create_list_revoke_and_the_roles_they_give(server):
    made = detox(server, "keys", "create", "ci-bot", "--role", "reader")
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()  # stdout holds the key alone (scripts capture it)
    assert key.startswith("dtx_") and "shown only now" in made.stderr

    as_reader = detox(server, "versions", "list", "--json", DETOX_API_KEY=key)
    assert as_reader.returncode == 0 and json.loads(as_reader.stdout) == {"data": []}
    refused = detox(server, "keys", "list", DETOX_API_KEY=key)
    assert refused.returncode == 2 and "needs the 'admin' role" in refused.stderr

    listed = json.loads(detox(server, "keys", "list", "--json").stdout)["data"]
    [row] = [k for k in listed if k["name"] == "ci-bot"]
    assert row["role"] == "reader" and row["prefix"] == key[:12] and "key" not in row
    table = detox(server, "keys", "list").stdout
    assert "ci-bot" in table and key not in table

    revoked = detox(server, "keys", "revoke", str(row["id"]))
    assert revoked.returncode == 0 and f"revoked key {row['id']}" in revoked.stdout
    after = detox(server, "versions", "list", DETOX_API_KEY=key)
    assert after.returncode == 2 and "invalid or revoked API key" in after.stderr
    every = json.loads(detox(server, "keys", "list", "--all", "--json").stdout)["data"]
    assert any(k["id"] == row["id"] and k["revoked_at"] for k in every)


def test_bad_input_is_one_line_and_exit_2(server):
    bad_role = detox(server, "keys", "create", "x", "--role", "root")
    assert bad_role.returncode == 2 and "--role must be one of" in bad_role.stderr
    missing = detox(server, "keys", "revoke", "424242")
    assert missing.returncode == 2 and missing.stderr.strip().count("\n") == 0
    no_key = detox(server, "keys", "list", DETOX_API_KEY="")
    assert no_key.returncode == 2 and "missing API key" in no_key.stderr
