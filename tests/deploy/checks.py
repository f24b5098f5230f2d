"""The checks of the container files, one plain function each: `check(compose, dockerfile)`
raises AssertionError naming what is wrong. `compose` is the parsed, interpolated compose file
(or a compose client's rendering of it), `dockerfile` the Dockerfile's instructions. The
expectations come from the code: the settings module, the CLI's commands, pyproject.toml."""

from __future__ import annotations

import os
import re
import shlex
import tomllib
from collections.abc import Callable, Iterable
from typing import Any
from unittest import mock
from urllib.parse import urlsplit

import typer.main
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from pydantic import ValidationError
from sqlalchemy.engine import make_url

from app.cli.main import app as cli_app
from app.settings import Settings
from tests.deploy.containers import (
    DOCKERFILE,
    ROOT,
    Instruction,
    arg_defaults,
    env_assignments,
    environment,
    mounts,
    published_ports,
    stage_names,
)

Compose = dict[str, Any]
Dockerfile = list[Instruction]

PREFIX = Settings.model_config["env_prefix"]  # "DETOX_"
REQUIRED_SERVICES = {"postgres", "redis", "migrate", "api", "worker"}
APP_SERVICES = {"migrate": "migrate", "api": "api", "worker": "worker"}  # service: detox command
PG_DATA = "/var/lib/postgresql/data"
CLI_COMMANDS = set(typer.main.get_command(cli_app).commands)  # type: ignore[attr-defined]


def unknown_settings(keys: Iterable[str]) -> set[str]:
    """The DETOX_* names among `keys` that are no Settings field (case-insensitive, as pydantic-
    settings reads them)."""
    fields = set(Settings.model_fields)
    return {
        key
        for key in keys
        if key.upper().startswith(PREFIX) and key[len(PREFIX) :].lower() not in fields
    }


def _command(service: dict) -> list[str]:
    command = service.get("command") or []
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def _option(command: list[str], name: str, default: str) -> str:
    return command[command.index(name) + 1] if name in command else default


def _api_port(service: dict) -> int:
    return int(_option(_command(service), "--port", "8000"))


def _healthcheck(service: dict) -> list[str] | None:
    """The compose health check's test; [] when disabled, None when the service has none."""
    check = service.get("healthcheck")
    if check is None:
        return None
    test = check.get("test")
    if check.get("disable") or test in ("NONE", ["NONE"]):
        return []
    return ["CMD-SHELL", test] if isinstance(test, str) else [str(t) for t in test or []]


def _stage(dockerfile: Dockerfile, index: int = -1) -> list[Instruction]:
    stages = sorted({ins.stage for ins in dockerfile if ins.stage >= 0})
    return [ins for ins in dockerfile if ins.stage == stages[index]]


def _image_env(dockerfile: Dockerfile) -> dict[str, str]:
    found: dict[str, str] = {}
    for ins in _stage(dockerfile):
        if ins.keyword == "ENV":
            found |= env_assignments(ins)
    return found


def _image_healthcheck(dockerfile: Dockerfile) -> list[str] | None:
    checks = [ins for ins in _stage(dockerfile) if ins.keyword == "HEALTHCHECK"]
    return checks[-1].exec_form() if checks and checks[-1].args != "NONE" else None


def _settings(env: dict[str, str], service: str) -> Settings:
    """Settings as the service's process would read them: the image's ENV, then the service's."""
    with mock.patch.dict(os.environ, env, clear=True):
        try:
            return Settings()
        except ValidationError as exc:
            raise AssertionError(f"{service}: its environment is refused: {exc}") from exc


# --- checks of docker-compose.yml --------------------------------------------------------------


def check_services(compose: Compose, dockerfile: Dockerfile) -> None:
    missing = REQUIRED_SERVICES - set(compose["services"])
    assert not missing, f"services missing: {sorted(missing)}"


def check_built_image(compose: Compose, dockerfile: Dockerfile) -> None:
    services = compose["services"]
    declared = {ins.args.split("=")[0].strip() for ins in dockerfile if ins.keyword == "ARG"}
    built = {name for name, service in services.items() if "build" in service}
    assert set(APP_SERVICES) <= built, f"not built from the Dockerfile: {set(APP_SERVICES) - built}"
    images = set()
    for name in sorted(built):
        service = services[name]
        build = (
            service["build"]
            if isinstance(service["build"], dict)
            else {"context": service["build"]}
        )
        assert (ROOT / build.get("context", ".")).resolve() == ROOT, (
            f"{name}: context is not the repo"
        )
        assert build.get("dockerfile", "Dockerfile") == DOCKERFILE.name, f"{name}: other Dockerfile"
        unknown = set(build.get("args") or {}) - declared
        assert not unknown, f"{name}: build args the Dockerfile does not declare: {unknown}"
        images.add(service.get("image"))
        command = _command(service)
        assert command and command[0] in CLI_COMMANDS, f"{name}: `detox {command}` is no command"
        assert name not in APP_SERVICES or command[0] == APP_SERVICES[name], (
            f"{name} runs {command}"
        )
    assert len(images) == 1 and None not in images, f"one tag for the built image, not {images}"


def check_depends_on(compose: Compose, dockerfile: Dockerfile) -> None:
    services = compose["services"]
    ready = {"postgres": "service_healthy", "redis": "service_healthy"}
    expected = {
        "migrate": {"postgres": "service_healthy"},
        "api": ready | {"migrate": "service_completed_successfully"},
        "worker": ready | {"migrate": "service_completed_successfully"},
    }
    for name, wanted in expected.items():
        depends = services[name].get("depends_on") or {}
        assert isinstance(depends, dict), f"{name}: depends_on has no conditions"
        got = {dep: (spec or {}).get("condition") for dep, spec in depends.items()}
        assert got.items() >= wanted.items(), f"{name}: depends_on {got}, wanted {wanted}"
    for name, service in services.items():
        for dep, spec in (service.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on {dep}, which is no service"
            if (spec or {}).get("condition") == "service_healthy":
                assert _healthcheck(services[dep]), f"{name} waits for {dep}, which has no check"


def check_healthchecks(compose: Compose, dockerfile: Dockerfile) -> None:
    services = compose["services"]
    for name, probe in {"postgres": "pg_isready", "redis": "ping"}.items():
        test = _healthcheck(services[name])
        assert test and probe in " ".join(test), f"{name}: no health check with {probe}"
    image_check = _image_healthcheck(dockerfile)
    api = services["api"]
    api_test = _healthcheck(api)
    test = " ".join(api_test if api_test is not None else image_check or [])
    port = _api_port(api)
    assert re.search(rf"//(127\.0\.0\.1|localhost):{port}/(healthz|readyz)\b", test), (
        f"api: no health check of /healthz or /readyz on its port {port}: {test!r}"
    )
    if image_check:  # the image's check is the API's: services running other commands drop it
        for name, service in services.items():
            if "build" in service and _command(service)[:1] != ["api"]:
                assert _healthcheck(service) == [], f"{name} keeps the image's HTTP health check"


def check_gpu(compose: Compose, dockerfile: Dockerfile) -> None:
    worker = compose["services"]["worker"]
    reservations = ((worker.get("deploy") or {}).get("resources") or {}).get("reservations") or {}
    gpus = [
        device
        for device in reservations.get("devices") or []
        if device.get("driver") == "nvidia" and "gpu" in (device.get("capabilities") or [])
    ]
    assert len(gpus) == 1, f"worker: one NVIDIA GPU reservation expected, found {gpus}"
    count = gpus[0].get("count", len(gpus[0].get("device_ids") or []))
    assert count == 1, f"worker: one GPU per worker (solo pool), not {count}"
    device = environment(worker).get("DETOX_DEVICE", "auto")
    assert device == "auto" or device.startswith("cuda"), f"worker: DETOX_DEVICE={device}"


def check_volumes(compose: Compose, dockerfile: Dockerfile) -> None:
    services = compose["services"]
    declared = set(compose.get("volumes") or {})
    used = {m.source for service in services.values() for m in mounts(service) if m.named}
    assert used <= declared, f"named volumes not declared: {used - declared}"
    assert declared <= used, f"declared volumes no service mounts: {declared - used}"
    data = [m for m in mounts(services["postgres"]) if m.target == PG_DATA and m.named]
    assert data, f"postgres: no named volume at {PG_DATA}"
    image_cache = _image_env(dockerfile).get("DETOX_CACHE_DIR")
    caches = set()
    for name in ("api", "worker"):
        cache_dir = environment(services[name]).get("DETOX_CACHE_DIR", image_cache)
        assert cache_dir, f"{name}: DETOX_CACHE_DIR is set neither in the image nor here"
        assert image_cache in (None, cache_dir), f"{name}: cache {cache_dir}, image {image_cache}"
        sources = {m.source for m in mounts(services[name]) if m.target == cache_dir and m.named}
        assert sources, f"{name}: no named volume at the model cache {cache_dir}"
        caches |= sources
    assert len(caches) == 1, f"api and worker must share one model cache, not {caches}"
    assert caches.isdisjoint({m.source for m in data}), "the model cache is the database's volume"


def check_ports(compose: Compose, dockerfile: Dockerfile) -> None:
    services = compose["services"]
    api = services["api"]
    port = _api_port(api)
    assert _option(_command(api), "--host", "127.0.0.1") == "0.0.0.0", "api: unreachable"
    assert port in {target for _, target in published_ports(api)}, f"api: {port} not published"
    exposed = {
        w.split("/")[0] for ins in dockerfile if ins.keyword == "EXPOSE" for w in ins.args.split()
    }
    assert str(port) in exposed, f"the image does not EXPOSE {port}"
    for name, service in services.items():
        if name != "api":
            assert not published_ports(service), f"{name} is published; only the API should be"


def check_env_keys(compose: Compose, dockerfile: Dockerfile) -> None:
    for name, service in compose["services"].items():
        unknown = unknown_settings(environment(service))
        assert not unknown, f"{name}: {sorted(unknown)} are no settings (app/settings.py)"
    unknown = unknown_settings(_image_env(dockerfile))
    assert not unknown, f"Dockerfile ENV: {sorted(unknown)} are no settings"


def check_urls(compose: Compose, dockerfile: Dockerfile) -> None:
    services = compose["services"]
    pg = environment(services["postgres"])
    user = pg.get("POSTGRES_USER", "postgres")
    for name, service in services.items():
        if "build" not in service:
            continue
        settings = _settings(_image_env(dockerfile) | environment(service), name)
        assert settings.database_url, f"{name}: DETOX_DATABASE_URL is unset"
        url = make_url(settings.database_url)
        assert url.drivername == "postgresql+psycopg", f"{name}: driver {url.drivername}"
        assert url.host == "postgres" and (url.port or 5432) == 5432, f"{name}: database {url}"
        assert (url.username, url.password, url.database) == (
            user,
            pg.get("POSTGRES_PASSWORD"),
            pg.get("POSTGRES_DB", user),
        ), f"{name}: the database credentials differ from the postgres service's"
        broker = urlsplit(settings.resolved_broker_url())
        assert broker.scheme == "redis", f"{name}: broker {broker.geturl()}"
        assert (broker.hostname, broker.port or 6379) == ("redis", 6379), (
            f"{name}: broker {broker.geturl()}"
        )


# --- checks of the Dockerfile ------------------------------------------------------------------


def check_stages(compose: Compose, dockerfile: Dockerfile) -> None:
    stages = {ins.stage for ins in dockerfile if ins.keyword == "FROM"}
    assert len(stages) >= 2, f"multi-stage: {len(stages)} FROM"
    final, names = max(stages), stage_names(dockerfile)
    earlier = {names.get(s, str(s)) for s in stages if s < final} | {str(s) for s in stages}
    sources = re.findall(
        r"--from=(\S+)", " ".join(i.args for i in _stage(dockerfile) if i.keyword == "COPY")
    )
    assert set(sources) & earlier, "the final stage copies nothing from an earlier stage"


def _pip_runs(dockerfile: Dockerfile, pattern: str) -> list[tuple[int, Instruction]]:
    return [
        (index, ins)
        for index, ins in enumerate(dockerfile)
        if ins.keyword == "RUN" and "pip install" in ins.args and re.search(pattern, ins.args)
    ]


def check_torch_build(compose: Compose, dockerfile: Dockerfile) -> None:
    torch_runs = _pip_runs(dockerfile, r"\btorch==")
    assert torch_runs, "no RUN installs a pinned torch"
    index, run = torch_runs[0]
    declared = arg_defaults(dockerfile[:index], run.stage)  # ARGs are scoped to their stage
    args = {
        name: default
        for name, default in declared.items()
        if re.search(rf"download\.pytorch\.org/whl/\$\{{?{name}\b", run.args)
    }
    assert args, "the torch RUN takes its index (download.pytorch.org/whl/$ARG) from no ARG"
    (name, default), *_ = args.items()
    assert default and re.fullmatch(r"cpu|cu\d{3}", default), f"ARG {name} default {default!r}"
    compose_args = {
        arg for s in compose["services"].values() if isinstance(s.get("build"), dict)
        for arg in s["build"].get("args") or {}
    }  # fmt: skip
    assert name in compose_args, f"the compose file does not choose the torch build ({name})"
    pinned = re.search(r"torch==(\S+)", run.args)[1].strip("\"'")  # type: ignore[index]
    version = re.sub(r"\$\{?(\w+)\}?", lambda m: declared.get(m[1]) or "", pinned)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    spec = next(d[len("torch") :] for d in pyproject["dependencies"] if d.startswith("torch"))
    assert version and Version(version) in SpecifierSet(spec), f"torch {version} not in {spec}"
    project = [i for i, ins in _pip_runs(dockerfile, r"(\s)\.(\s|$|&)") if ins.stage == run.stage]
    assert project and min(project) > index, "torch must be installed before the project"


def check_project_install(compose: Compose, dockerfile: Dockerfile) -> None:
    runs = _pip_runs(dockerfile, r"(\s)\.(\s|$|&)")
    assert runs, "no RUN installs the project (pip install .)"
    index, run = runs[-1]
    # app/store/migrate.py finds alembic.ini and migrations/ next to app/: an editable install
    # keeps app/ in the source tree (a plain one would move it into site-packages).
    assert re.search(r"(--editable|-e)\s+\.", run.args), "the project install is not editable"
    copied = " ".join(
        i.args for i in dockerfile[:index] if i.keyword == "COPY" and i.stage == run.stage
    )
    for needed in ("alembic.ini", "migrations", "app", "workers", "pyproject.toml"):
        assert re.search(rf"(^|\s){needed}(\s|$)", copied), (
            f"the build stage does not copy {needed}"
        )


def check_user(compose: Compose, dockerfile: Dockerfile) -> None:
    users = [ins.args for ins in _stage(dockerfile) if ins.keyword == "USER"]
    assert users, "the final stage has no USER (it would run as root)"
    assert users[-1].split(":")[0] not in ("root", "0"), f"USER {users[-1]} is root"


def check_entrypoint(compose: Compose, dockerfile: Dockerfile) -> None:
    final = _stage(dockerfile)
    entrypoints = [i.exec_form() for i in final if i.keyword == "ENTRYPOINT"]
    cmds = [i.exec_form() for i in final if i.keyword == "CMD"]
    entrypoint, cmd = (entrypoints or [None])[-1], (cmds or [None])[-1]
    assert entrypoint == ["detox"], f"ENTRYPOINT {entrypoint}: not the exec form of `detox`"
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "detox" in scripts, "pyproject.toml installs no `detox` command"
    assert cmd and cmd[0] in CLI_COMMANDS, f"CMD {cmd}: no detox command"
    assert _option(cmd, "--host", "127.0.0.1") == "0.0.0.0", f"CMD {cmd}: API unreachable"


CHECKS: list[Callable[[Compose, Dockerfile], None]] = [
    check_services,
    check_built_image,
    check_depends_on,
    check_healthchecks,
    check_gpu,
    check_volumes,
    check_ports,
    check_env_keys,
    check_urls,
    check_stages,
    check_torch_build,
    check_project_install,
    check_user,
    check_entrypoint,
]
