"""Health, readiness, the OpenAPI document, and the API's imports (no torch)."""

from __future__ import annotations

import subprocess
import sys

from fastapi.testclient import TestClient

from app.api.main import create_app
from tests.api.conftest import assert_error, closed_port
from tests.services import AUTH


def test_healthz(api):
    response = api.get("/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def test_readyz_reports_every_check(api):
    response = api.get("/readyz")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "ready"
    assert set(body["checks"]) == {"database", "broker", "model", "engine"}
    assert all(check["ok"] for check in body["checks"].values())
    assert body["checks"]["engine"]["detail"].startswith("builtin")


def test_readyz_is_503_naming_the_vllm_engine_when_it_does_not_answer(api_settings, session):
    url = f"http://127.0.0.1:{closed_port()}"
    down = api_settings.model_copy(update={"engine": "vllm", "vllm_url": url})
    with TestClient(create_app(down), headers=AUTH) as client:
        response = client.get("/readyz")
        assert client.get("/v1/versions").status_code == 200  # detox itself keeps answering
    error = assert_error(response, 503)
    assert error["code"] == "not_ready" and "engine" in error["message"]
    engine = response.json()["checks"]["engine"]
    assert engine["ok"] is False and f"vLLM at {url} does not answer" in engine["detail"]


def test_readyz_is_503_with_reasons_when_the_broker_is_down(api_settings, session):
    down = api_settings.model_copy(update={"broker_url": f"redis://127.0.0.1:{closed_port()}/0"})
    with TestClient(create_app(down), headers=AUTH) as client:
        response = client.get("/readyz")
    error = assert_error(response, 503)
    assert error["code"] == "not_ready" and "broker" in error["message"]
    checks = response.json()["checks"]
    assert checks["broker"]["ok"] is False and checks["broker"]["detail"]
    assert checks["database"]["ok"] is True


def test_readyz_names_a_missing_model(api_settings, session, tmp_path):
    missing = api_settings.model_copy(update={"model": str(tmp_path / "no-such-model")})
    with TestClient(create_app(missing), headers=AUTH) as client:
        response = client.get("/readyz")
    assert_error(response, 503)
    assert response.json()["checks"]["model"] == {
        "ok": False,
        "detail": "no model 'no-such-model' where DETOX_MODEL points",
    }


def test_readyz_names_the_model_never_a_path_of_this_machine(api_settings, session, tmp_path):
    folder = tmp_path / "models" / "my-model"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    for model, cache in [(str(folder), tmp_path), ("demo", tmp_path / "cache")]:
        if model == "demo":  # a converted demo model, in the cache folder
            converted = cache / "models" / "smollm2-135m-instruct"
            converted.mkdir(parents=True)
            (converted / "config.json").write_text("{}")
        settings = api_settings.model_copy(update={"model": model, "cache_dir": cache})
        with TestClient(create_app(settings)) as client:  # no key: /readyz is public
            detail = client.get("/readyz").json()["checks"]["model"]["detail"]
        assert str(tmp_path) not in detail, detail
        assert ("my-model" if model != "demo" else "smollm2-135m-instruct") in detail, detail


def test_every_request_body_has_an_example(api):
    spec = api.get("/openapi.json").json()
    bodies = [
        (path, method, op["requestBody"])
        for path, item in spec["paths"].items()
        for method, op in item.items()
        if "requestBody" in op
    ]
    assert bodies, "no request bodies at all?"
    for path, method, body in bodies:
        assert body["content"], f"{method} {path}"
        for media_type, content in body["content"].items():
            assert content.get("examples") or content.get("example"), (
                f"{method} {path} {media_type}"
            )
    assert api.get("/docs").status_code == 200


def test_importing_and_running_the_api_does_not_import_torch():
    code = (
        "import sys\n"
        "from app.api.main import create_app\n"
        "from app.api.broker import broker_error\n"
        "from app.settings import Settings\n"
        "create_app(Settings(broker_url='redis://127.0.0.1:1/0'))\n"
        "broker_error()\n"
        "import app.cli.main\n"
        "bad = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
        "assert not bad, bad\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_unknown_routes_and_methods_use_the_envelope(api):
    assert assert_error(api.get("/v1/nothing-here"), 404)["type"] == "not_found_error"
    assert_error(api.put("/v1/jobs"), 405)
