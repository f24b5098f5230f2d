"""The container files, checked without a Docker engine (the checks are in tests/deploy/checks.py):
every service, port, volume and DETOX_* variable of docker-compose.yml against the settings module
and the CLI; the Dockerfile's stages, torch build argument, user and entry point; .dockerignore;
and `docker compose config` (or docker-compose v1's) where a compose client is installed. The
mutation tests run each check on a broken copy of the files and expect it to fail, so no check
passes vacuously."""

from __future__ import annotations

import copy
import fnmatch
import os
import shutil
import subprocess
from collections.abc import Callable
from typing import Any

import pytest
import yaml

from tests.deploy.checks import (
    CHECKS,
    PREFIX,
    REQUIRED_SERVICES,
    Compose,
    Dockerfile,
    check_built_image,
    check_depends_on,
    check_entrypoint,
    check_env_keys,
    check_gpu,
    check_healthchecks,
    check_ports,
    check_project_install,
    check_services,
    check_stages,
    check_torch_build,
    check_urls,
    check_user,
    check_volumes,
    unknown_settings,
)
from tests.deploy.containers import (
    COMPOSE_FILE,
    DOCKERFILE,
    DOCKERIGNORE,
    ROOT,
    MissingVariable,
    environment,
    load_compose,
    parse_dockerfile,
    variables,
)

SECRETS = {
    "POSTGRES_PASSWORD": "pw-for-the-compose-test",
    "DETOX_ADMIN_KEY": "admin-key-" + "0" * 32,
}


@pytest.fixture(scope="module")
def compose() -> Compose:
    return load_compose(SECRETS)


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return parse_dockerfile(DOCKERFILE.read_text())


@pytest.mark.parametrize("check", CHECKS, ids=lambda check: check.__name__)
def test_container_files(check, compose, dockerfile):
    check(compose, dockerfile)


def test_detox_variables_of_the_compose_file_are_settings():
    names = {name for name in variables(COMPOSE_FILE.read_text()) if name.startswith(PREFIX)}
    assert not unknown_settings(names)


@pytest.mark.parametrize("secret", sorted(SECRETS))
def test_secrets_have_no_defaults(secret):
    with pytest.raises(MissingVariable, match=secret):
        load_compose({k: v for k, v in SECRETS.items() if k != secret})


def test_dockerignore_keeps_state_out_and_the_sources_in():
    patterns = [
        line.strip() for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]  # fmt: skip
    for path in (".git", ".venv", ".detox", "out", ".env", "app/__pycache__", ".pytest_cache"):
        assert any(fnmatch.fnmatch(path, p) for p in patterns), f"{path} is not excluded"
    for path in ("pyproject.toml", "README.md", "alembic.ini", "app", "workers", "migrations"):
        assert not any(fnmatch.fnmatch(path, p) for p in patterns), f"{path} is excluded"


# --- each check fails on a broken copy ---------------------------------------------------------


def _env_of(compose: Compose, service: str) -> dict[str, Any]:
    return compose["services"][service]["environment"]


def _replace_env(service: str, key: str, old: str, new: str) -> Callable[[Compose], None]:
    def mutate(compose: Compose) -> None:
        value = _env_of(compose, service)[key]
        assert old in value
        _env_of(compose, service)[key] = value.replace(old, new)

    return mutate


def _set(service: str, **values: Any) -> Callable[[Compose], None]:
    return lambda compose: compose["services"][service].update(values)


def _gpu(compose: Compose) -> dict[str, Any]:
    return compose["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"][0]


def _drop(service: str, key: str) -> Callable[[Compose], None]:
    return lambda compose: compose["services"][service].pop(key)


COMPOSE_MUTATIONS = [
    (check_services, "no migrate service", lambda c: c["services"].pop("migrate")),
    (check_built_image, "worker runs another image", _set("worker", image="python:3.11")),
    (check_built_image, "api runs no detox command", _set("api", command=["serve"])),
    (check_built_image, "migrate not built", _drop("migrate", "build")),
    (
        check_depends_on,
        "api starts before the migration ends",
        lambda c: c["services"]["api"]["depends_on"]["migrate"].update(condition="service_started"),
    ),
    (
        check_depends_on,
        "worker waits for no migration",
        lambda c: c["services"]["worker"]["depends_on"].pop("migrate"),
    ),
    (check_depends_on, "waits for a service without a check", _drop("redis", "healthcheck")),
    (check_healthchecks, "worker inherits the HTTP check", _drop("worker", "healthcheck")),
    (check_healthchecks, "postgres unchecked", _drop("postgres", "healthcheck")),
    (
        check_healthchecks,
        "api checked on another port",
        _set("api", command=["api", "--host", "0.0.0.0", "--port", "9000"]),
    ),
    (check_gpu, "worker reserves no GPU", _drop("worker", "deploy")),
    (
        check_gpu,
        "not an NVIDIA reservation",
        lambda c: _gpu(c).update(driver="amd"),
    ),
    (check_gpu, "GPU worker on the CPU", lambda c: _env_of(c, "worker").update(DETOX_DEVICE="cpu")),
    (check_volumes, "worker without the model cache", _set("worker", volumes=[])),
    (check_volumes, "undeclared volume", lambda c: c["volumes"].pop("postgres-data")),
    (
        check_volumes,
        "cache elsewhere than mounted",
        lambda c: _env_of(c, "api").update(DETOX_CACHE_DIR="/tmp/c"),
    ),
    (check_ports, "postgres published", _set("postgres", ports=["5432:5432"])),
    (check_ports, "api publishes another port", _set("api", ports=["8000:8080"])),
    (
        check_env_keys,
        "a misspelt setting",
        lambda c: _env_of(c, "worker").update(DETOX_DEVISE="cuda"),
    ),
    (
        check_urls,
        "database host is no service",
        _replace_env("api", "DETOX_DATABASE_URL", "@postgres:", "@db:"),
    ),
    (
        check_urls,
        "wrong password",
        _replace_env("worker", "DETOX_DATABASE_URL", SECRETS["POSTGRES_PASSWORD"], "x"),
    ),
    (
        check_urls,
        "broker on localhost",
        _replace_env("api", "DETOX_BROKER_URL", "//redis:", "//localhost:"),
    ),
    (
        check_urls,
        "a URL Settings refuse",
        _replace_env("migrate", "DETOX_DATABASE_URL", "postgresql+psycopg", "mysql"),
    ),
]

DOCKERFILE_MUTATIONS = [  # (check, what is wrong, {old text: new text})
    (check_stages, "one stage", {"FROM ${PYTHON_IMAGE} AS runtime": ""}),
    (check_stages, "nothing copied from the build stage", {"--from=build": "--from=python:3.11"}),
    (
        check_torch_build,
        "torch from PyPI",
        {'--index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}"': ""},
    ),
    (
        check_torch_build,
        "torch outside the project's range",
        {"ARG TORCH_VERSION=2.13.0": "ARG TORCH_VERSION=2.12.0"},
    ),
    (
        check_torch_build,
        "the torch ARG declared before FROM only (it does not reach the stage)",
        {
            "ARG TORCH_VARIANT=cpu\n": "",
            "ARG PYTHON_IMAGE=": "ARG TORCH_VARIANT=cpu\nARG PYTHON_IMAGE=",
        },
    ),
    (check_project_install, "not editable", {"--editable .": "."}),
    (check_project_install, "migrations not copied", {"COPY migrations ./migrations\n": ""}),
    (check_user, "runs as root", {"USER 10001:10001": "USER root"}),
    (check_user, "no USER", {"USER 10001:10001": ""}),
    (check_entrypoint, "not detox", {'ENTRYPOINT ["detox"]': 'ENTRYPOINT ["python"]'}),
    (check_entrypoint, "API on loopback only", {'"--host", "0.0.0.0"': '"--host", "127.0.0.1"'}),
]


@pytest.mark.parametrize(
    "check, mutate", [(check, mutate) for check, _, mutate in COMPOSE_MUTATIONS],
    ids=[description for _, description, _ in COMPOSE_MUTATIONS],
)  # fmt: skip
def test_compose_checks_fail_on_broken_copies(check, mutate, compose, dockerfile):
    broken = copy.deepcopy(compose)
    mutate(broken)
    with pytest.raises(AssertionError):
        check(broken, dockerfile)


@pytest.mark.parametrize(
    "check, edits", [(check, edits) for check, _, edits in DOCKERFILE_MUTATIONS],
    ids=[description for _, description, _ in DOCKERFILE_MUTATIONS],
)  # fmt: skip
def test_dockerfile_checks_fail_on_broken_copies(check, edits, compose):
    text = DOCKERFILE.read_text()
    for old, new in edits.items():
        assert old in text
        text = text.replace(old, new)
    with pytest.raises(AssertionError):
        check(compose, parse_dockerfile(text))


# --- the compose client's own reading, where one is installed ----------------------------------


def _compose_client() -> list[str] | None:
    docker = shutil.which("docker")
    if (
        docker
        and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0
    ):
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")  # v1 (e.g. Debian's docker-compose): no engine needed
    return [legacy] if legacy else None


@pytest.fixture(scope="module")
def compose_config(tmp_path_factory) -> Callable[[dict[str, str]], subprocess.CompletedProcess]:
    client = _compose_client()
    if client is None:
        pytest.skip("no compose client (neither `docker compose` nor docker-compose installed)")
    empty = tmp_path_factory.mktemp("compose") / "empty.env"  # a developer's .env stays out
    empty.write_text("")

    options = ["--env-file", str(empty), "config"]

    def run(env: dict[str, str]) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*client, "--project-directory", str(ROOT), "-f", str(COMPOSE_FILE), *options],
            env={"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/"), **env},
            capture_output=True,
            text=True,
            timeout=120,
        )

    return run


def test_the_compose_client_accepts_the_file(compose_config, compose, dockerfile):
    done = compose_config(SECRETS)
    assert done.returncode == 0, done.stderr
    rendered = yaml.safe_load(done.stdout)
    assert set(rendered["services"]) >= REQUIRED_SERVICES
    for check in CHECKS:  # the client's normal form passes the same checks
        check(rendered, dockerfile)
    for name, service in rendered["services"].items():  # and it interpolates as load_compose does
        assert environment(service) == environment(compose["services"][name]), name


def test_the_compose_client_refuses_the_file_without_the_secrets(compose_config):
    done = compose_config({"DETOX_ADMIN_KEY": SECRETS["DETOX_ADMIN_KEY"]})
    assert done.returncode != 0
    assert "POSTGRES_PASSWORD" in done.stderr
