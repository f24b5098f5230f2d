"""/ui without a browser: the page and its files are served with the right types and headers,
without an API key, and nothing outside the shipped files can be read through it."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.api.main import create_app
from app.api.routes.ui import ASSETS, STATIC
from app.settings import Settings
from tests.api.conftest import assert_error

IMPORT = re.compile(r"""^import .*? from "\./([\w.-]+)";$""", re.MULTILINE)
# Ways to put markup (rather than text) into the page, or to run strings as code.
UNSAFE_DOM = re.compile(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|\beval\(")


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(
        home=tmp_path / "home", database_url=f"sqlite:///{tmp_path / 'ui.db'}",
        broker_url="memory://",
    )  # fmt: skip
    with TestClient(create_app(settings)) as client:
        yield client


@pytest.mark.parametrize("path", ["/ui", "/ui/"])
def test_the_page_is_served_without_a_key(client: TestClient, path: str):
    response = client.get(path)
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert "script-src 'self'" in response.headers["content-security-policy"]
    assert response.headers["x-content-type-options"] == "nosniff"
    assert '<script type="module" src="/ui/app.js"></script>' in response.text


def test_every_file_the_page_loads_is_served_with_its_type(client: TestClient):
    index = (STATIC / "index.html").read_text()
    wanted = set(re.findall(r'(?:src|href)="/ui/([\w.-]+)"', index))
    for module in STATIC.glob("*.js"):
        wanted |= set(IMPORT.findall(module.read_text()))
    assert {"app.js", "style.css", "api.js", "jobs.js", "versions.js", "ab.js"} <= wanted
    assert wanted <= set(ASSETS)
    types = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}
    for name in sorted(wanted):
        response = client.get(f"/ui/{name}")
        assert response.status_code == 200, name
        assert response.headers["content-type"] == types[Path(name).suffix]
        assert response.headers["cache-control"] == "no-cache" and response.headers["etag"]


@pytest.mark.parametrize(
    "path", ["/ui/nope.js", "/ui/index.htm", "/ui/..%2Fmain.py", "/ui/%2E%2E/routes/ui.py"]
)
def test_only_the_shipped_files_are_served(client: TestClient, path: str):
    response = client.get(path)
    assert response.status_code == 404
    assert_error(response, 404)


def test_the_scripts_put_data_into_the_page_as_text_only():
    for module in sorted(STATIC.glob("*.js")):
        source = module.read_text()
        assert not UNSAFE_DOM.search(source), f"{module.name}: {UNSAFE_DOM.search(source)}"


def test_the_api_documentation_leaves_the_page_out(client: TestClient):
    paths = client.get("/openapi.json").json()["paths"]
    assert not [p for p in paths if p.startswith("/ui")]
