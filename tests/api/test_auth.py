"""API keys and roles, on the real store (both backends) with a tiny model behind generation.

The walk goes over every operation in the live OpenAPI spec: with no key, a malformed header, a
wrong key and a revoked key every protected route answers 401; with each role it answers 403
exactly when the role is below the route's `x-required-role`, and otherwise lets the request
through to the route (whatever the route then says about the dummy input).
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.api.conftest import assert_error, make_tiny_app
from tests.services import ADMIN_KEY, AUTH

PUBLIC = {("get", "/healthz"), ("get", "/readyz")}
RANK = {"reader": 0, "editor": 1, "admin": 2}
DUMMY_PATH_VALUES = {"job_id": "no-such-job", "name": "no-such-version", "key_id": "999999",
                     "id_or_name": "no-such-corpus"}  # fmt: skip


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def new_key(client: TestClient, role: str, name: str | None = None) -> dict[str, Any]:
    response = client.post("/v1/keys", json={"name": name or role, "role": role}, headers=AUTH)
    assert response.status_code == 201, response.text
    return response.json()


def operations(client: TestClient) -> list[tuple[str, str, str | None]]:
    spec = client.get("/openapi.json").json()
    return [
        (method, path, op.get("x-required-role"))
        for path, item in spec["paths"].items()
        for method, op in item.items()
    ]


def call(client: TestClient, method: str, path: str, headers: dict[str, str]) -> Any:
    url = re.sub(r"\{(\w+)\}", lambda m: DUMMY_PATH_VALUES[m.group(1)], path)
    body = {} if method in ("post", "put", "patch") else None
    return client.request(method.upper(), url, json=body, headers=headers)


def test_every_route_but_health_declares_a_role(client):
    ops = operations(client)
    assert {(m, p) for m, p, role in ops if role is None} == PUBLIC
    assert {role for _, _, role in ops} - {None} == set(RANK)


def test_every_route_refuses_a_missing_wrong_malformed_or_revoked_key(client):
    revoked = new_key(client, "admin", "to-revoke")
    assert client.delete(f"/v1/keys/{revoked['id']}", headers=AUTH).status_code == 200
    callers = {
        "no key": ({}, "missing_api_key"),
        "not bearer": ({"Authorization": f"Basic {ADMIN_KEY}"}, "malformed_authorization"),
        "wrong key": (auth("dtx_" + "x" * 43), "invalid_api_key"),
        "revoked key": (auth(revoked["key"]), "invalid_api_key"),
    }
    for method, path, role in operations(client):
        if role is None:
            continue
        for who, (headers, code) in callers.items():
            response = call(client, method, path, headers)
            error = assert_error(response, 401)
            assert error["code"] == code, (method, path, who, error)
            assert error["type"] == "authentication_error"
            assert response.headers["WWW-Authenticate"] == "Bearer"


def test_each_role_reaches_exactly_the_routes_of_its_rank(client):
    keys = {role: new_key(client, role)["key"] for role in RANK}
    checked = 0
    for method, path, required in operations(client):
        if required is None:
            continue
        for role, key in keys.items():
            response = call(client, method, path, auth(key))
            if RANK[role] < RANK[required]:
                error = assert_error(response, 403)
                assert error["code"] == "insufficient_role" and required in error["message"]
            else:
                # Let through: whatever the route says of the dummy input, it is not about auth.
                assert response.status_code not in (401, 403, 500), (method, path, role)
                assert response.status_code < 500, response.text
            checked += 1
    assert checked >= 3 * 19


def test_public_routes_need_no_key(client):
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code in (200, 503)  # the demo model may be unconverted
    assert client.get("/openapi.json").status_code == 200


def test_keys_are_shown_once_stored_hashed_and_revocable(client, session_factory):
    made = new_key(client, "editor", "ci-bot")
    assert made["key"].startswith("dtx_") and made["prefix"] == made["key"][:12]
    listed = client.get("/v1/keys", headers=AUTH).json()["data"]
    assert [k["name"] for k in listed] == ["ci-bot"]
    assert "key" not in listed[0] and made["key"] not in str(listed)
    with session_factory() as session:  # only the hash is in the database
        from app.store.models import ApiKey

        row = session.query(ApiKey).one()
        assert made["key"] not in (row.key_hash, row.prefix, row.name)
        assert len(row.key_hash) == 64

    headers = auth(made["key"])
    assert client.get("/v1/versions", headers=headers).status_code == 200
    revoked = client.delete(f"/v1/keys/{made['id']}", headers=AUTH).json()
    assert revoked["revoked_at"] is not None
    assert_error(client.get("/v1/versions", headers=headers), 401)  # at once: no cache grace
    assert client.get("/v1/keys", headers=AUTH).json()["data"] == []
    every = client.get("/v1/keys?include_revoked=true", headers=AUTH).json()["data"]
    assert [k["id"] for k in every] == [made["id"]]
    assert_error(client.delete("/v1/keys/424242", headers=AUTH), 404)


@pytest.mark.parametrize(
    ("body", "param"),
    [({"name": "x", "role": "root"}, "role"), ({"name": ""}, "name"), ({"role": "reader"}, "name"),
     ({"name": "x", "extra": 1}, "extra")],
)  # fmt: skip
def test_bad_key_requests_name_the_field(client, body, param):
    assert_error(client.post("/v1/keys", json=body, headers=AUTH), 422, param=param)


def test_the_last_admin_key_is_kept_without_a_bootstrap_key(
    tiny_settings, session_factory, redis_queue
):
    with TestClient(make_tiny_app(tiny_settings)) as bootstrap:
        first = new_key(bootstrap, "admin", "first")
    alone = tiny_settings.model_copy(update={"admin_key": None})
    with TestClient(make_tiny_app(alone), headers=auth(first["key"])) as client:
        error = assert_error(client.delete(f"/v1/keys/{first['id']}"), 409)
        assert error["code"] == "last_admin_key"
        second = client.post("/v1/keys", json={"name": "second", "role": "admin"}).json()
        assert client.delete(f"/v1/keys/{first['id']}").status_code == 200
        assert_error(client.get("/v1/keys"), 401)  # the first key is gone
        client.headers.update(auth(second["key"]))
        assert client.get("/v1/keys").status_code == 200


def test_without_auth_everyone_is_an_admin(tiny_settings, session_factory, redis_queue):
    open_settings = tiny_settings.model_copy(update={"auth": False, "admin_key": None})
    with TestClient(make_tiny_app(open_settings)) as client:
        assert client.get("/v1/keys").status_code == 200
        assert client.get("/v1/versions", headers=auth("anything")).status_code == 200


def test_a_db_outage_keeps_known_keys_working_for_generation(client, store_engine):
    key = new_key(client, "reader")["key"]
    headers = auth(key)
    assert client.get("/v1/models", headers=headers).status_code == 200
    client.app.state.key_cache.ttl_s = 0  # every request would read the database again
    client.app.state.sessionmaker.kw["bind"] = _unreachable_engine()
    response = client.get("/v1/models", headers=headers)
    assert response.status_code == 200, response.text  # the known key still holds
    unknown = client.get("/v1/models", headers=auth("dtx_never-seen"))
    error = assert_error(unknown, 503)
    assert error["code"] == "database_unavailable" and unknown.headers["Retry-After"]


def _unreachable_engine():
    from app.store.db import make_engine
    from tests.api.conftest import closed_port

    return make_engine(
        f"postgresql+psycopg://postgres@127.0.0.1:{closed_port()}/x",
        connect_args={"connect_timeout": 1},
    )
