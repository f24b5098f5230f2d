"""GET/DELETE /v1/versions: the contract's JSON, "latest", retiring with and without cascade."""

from __future__ import annotations

import re

from app.store import crud
from tests.api.conftest import assert_error
from tests.store import factories

VERSION_KEYS = {"name", "parent", "job_id", "kind", "created_at", "metrics", "delta", "retired"}


def test_list_and_show(api, session):
    root = factories.version(session, name="root")
    factories.version(
        session,
        name="child",
        parent=root,
        deltas=[factories.delta("a.weight", b"12345"), factories.delta("b.weight", b"678")],
    )
    listed = api.get("/v1/versions").json()
    assert set(listed) == {"data"}
    assert [v["name"] for v in listed["data"]] == ["root", "child"]  # oldest first
    child = api.get("/v1/versions/child").json()
    assert set(child) == VERSION_KEYS and child == listed["data"][1]
    assert child["parent"] == "root" and child["kind"] == "dinm" and not child["retired"]
    assert child["metrics"] == {"DS": 90.0}
    assert child["job_id"] == crud.get_version(session=session, name="child").job_id
    delta = child["delta"]
    assert set(delta) == {"params", "bytes", "encoding", "sha256"}
    assert delta["params"] == ["a.weight", "b.weight"] and delta["bytes"] == 8
    assert delta["encoding"] == "dense" and re.fullmatch(r"[0-9a-f]{64}", delta["sha256"])
    assert api.get("/v1/versions/root").json()["parent"] == "base"
    assert api.get("/v1/versions/latest").json()["name"] == "child"


def test_missing_versions_are_404(api, session):
    assert_error(api.get("/v1/versions/nope"), 404)
    assert_error(api.get("/v1/versions/latest"), 404)  # no versions yet
    assert_error(api.delete("/v1/versions/nope"), 404)


def test_retire_refuses_live_children_unless_cascade(api, session):
    root = factories.version(session, name="r")
    mid = factories.version(session, name="m", parent=root)
    factories.version(session, name="leaf", parent=mid)
    error = assert_error(api.delete("/v1/versions/r"), 409)
    assert error["code"] == "version_has_children" and "m" in error["message"]
    retired = api.delete("/v1/versions/r", params={"cascade": "true"})
    assert retired.status_code == 200
    assert [v["name"] for v in retired.json()["data"]] == ["r", "m", "leaf"]
    assert all(v["retired"] for v in retired.json()["data"])
    assert api.get("/v1/versions").json()["data"] == []
    everything = api.get("/v1/versions", params={"include_retired": "true"}).json()["data"]
    assert len(everything) == 3
    assert api.get("/v1/versions/m").json()["retired"] is True  # still readable by name
    assert_error(api.delete("/v1/versions/r"), 404)  # already retired


def test_retire_a_leaf(api, session):
    root = factories.version(session, name="keep")
    factories.version(session, name="drop", parent=root)
    retired = api.delete("/v1/versions/drop").json()["data"]
    assert [v["name"] for v in retired] == ["drop"]
    assert api.get("/v1/versions/latest").json()["name"] == "keep"
    assert_error(api.delete("/v1/versions/latest"), 422, param="name")
