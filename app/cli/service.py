"""The service processes: `detox api`, `detox worker`, `detox up` (API + one worker) and the
one-shot `detox migrate`."""

from __future__ import annotations

import ipaddress
import os
import signal
import sys
from typing import Annotated

import typer

from app.cli.output import console
from app.cli.supervisor import WorkerSupervisor, exit_with_parent
from app.cli.vllm_child import start_vllm_child
from app.logs import configure_logging
from app.settings import Settings, get_settings

HostOpt = Annotated[str, typer.Option(help="address to listen on")]
PortOpt = Annotated[int, typer.Option(min=1, max=65535, help="port to listen on")]
GRACEFUL_S = 5  # open event streams get this long to end on shutdown
WORKER_STOP_S = 20.0  # a worker finishing its step gets this long before it is killed


def register(app: typer.Typer) -> None:
    app.command()(api)
    app.command()(worker)
    app.command()(up)
    app.command()(migrate)


def api(host: HostOpt = "127.0.0.1", port: PortOpt = 8000) -> None:
    """The HTTP API (production: DETOX_DATABASE_URL, DETOX_BROKER_URL). Migrates first."""
    settings = get_settings()
    _check_exposure(settings, host)
    _migrate(settings)
    if settings.auth and settings.admin_key is None and not _has_admin_key(settings):
        console.print(
            "[yellow]warning:[/yellow] no admin API key exists: set DETOX_ADMIN_KEY to manage "
            "keys (`detox keys create`)",
            highlight=False,
        )
    _serve(settings, host, port)


def worker() -> None:
    """One Celery worker (solo pool): runs edit jobs on this machine's accelerator."""
    from workers.main import run_worker

    exit_with_parent()  # started by `detox up`: never outlive it
    code = run_worker(get_settings())
    if code:
        raise typer.Exit(code)


def migrate() -> None:
    """Migrate the database (DETOX_DATABASE_URL) to the latest revision, then exit: the one-shot
    step before the API and the workers start (containers, deploys)."""
    from app.store.migrate import current_revision

    settings = get_settings()
    _migrate(settings)
    revision = current_revision(settings.resolved_database_url())
    console.print(f"database at revision {revision}", highlight=False)


def up(
    host: HostOpt = "127.0.0.1",
    port: PortOpt = 8000,
    engine: Annotated[
        str | None,
        typer.Option(
            help='what decodes generations: "builtin" or "vllm" (a vLLM server at '
            "DETOX_VLLM_URL, started here unless one answers there); default DETOX_ENGINE"
        ),
    ] = None,
) -> None:
    """Everything on this machine: the API and one worker, state under DETOX_HOME (SQLite and a
    broker that needs no server by default). A worker that dies is restarted (the API serves
    meanwhile); Ctrl-C stops both."""
    settings = get_settings()
    if engine is not None:
        if engine not in ("builtin", "vllm"):
            console.print(f'[red]error:[/red] --engine is "builtin" or "vllm", not {engine!r}')
            raise typer.Exit(2)
        settings = settings.model_copy(update={"engine": engine})
    _check_exposure(settings, host)
    home = settings.home_dir()
    _migrate(settings)
    if settings.auth and settings.admin_key is None and not _has_admin_key(settings):
        _print_first_admin_key(settings, f"http://{host}:{port}")
    env = {**os.environ, "DETOX_HOME": str(home)}  # the worker must find the same state
    vllm = start_vllm_child(settings) if settings.engine == "vllm" else None
    supervisor = WorkerSupervisor(
        [sys.executable, "-m", "app.cli", "worker"],
        env,
        backoff_s=settings.worker_restart_backoff_s,
        backoff_max_s=settings.worker_restart_backoff_max_s,
        stop_timeout_s=WORKER_STOP_S,
    )
    # uvicorn re-raises the SIGTERM it shut down on; as an exception it lets `finally` run.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        pid = supervisor.start()
        console.print(
            f"detox is up at [bold]http://{host}:{port}[/bold] (docs at /docs), "
            f"state in {home}, worker pid {pid}; Ctrl-C stops",
            highlight=False,
            soft_wrap=True,
        )
        _serve(settings, host, port, worker=supervisor)
    finally:
        supervisor.stop()
        if vllm is not None:
            vllm.stop()


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def _check_exposure(settings: Settings, host: str) -> None:
    """Refuse to serve without authentication on anything but a loopback address."""
    if not settings.auth and not is_loopback(host):
        console.print(
            f"[red]error:[/red] refusing to listen on {host} with authentication disabled "
            "(DETOX_AUTH=false): listen on 127.0.0.1, or enable authentication",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(2)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def _has_admin_key(settings: Settings) -> bool:
    from app.store import crud
    from app.store.db import make_engine, make_sessionmaker

    engine = make_engine(settings.resolved_database_url())
    try:
        with make_sessionmaker(engine)() as session:
            return crud.count_live_api_keys(session=session, role="admin") > 0
    finally:
        engine.dispose()


def _print_first_admin_key(settings: Settings, url: str) -> None:
    """The first start: an admin key is made and printed, this once (only its hash is kept)."""
    from app.api.auth import issue_key
    from app.store.db import make_engine, make_sessionmaker

    engine = make_engine(settings.resolved_database_url())
    try:
        with make_sessionmaker(engine)() as session:
            _row, key = issue_key(session=session, name="admin (detox up)", role="admin")
    finally:
        engine.dispose()
    console.print(
        "[bold]First start: an admin API key was created. It is shown only now; store it:[/bold]"
        f"\n\n    export DETOX_API_KEY={key}\n\n"
        f"Send it as `Authorization: Bearer <key>` to {url}; `detox keys create NAME --role "
        "reader|editor|admin` makes more.",
        highlight=False,
        soft_wrap=True,
    )


def _migrate(settings: Settings) -> None:
    from app.store.migrate import upgrade

    upgrade(settings.resolved_database_url())


def _serve(
    settings: Settings, host: str, port: int, *, worker: WorkerSupervisor | None = None
) -> None:
    import uvicorn

    from app.api.main import create_app

    configure_logging(settings.log_format, settings.log_level)
    app = create_app(settings)
    if worker is not None:
        app.state.worker_check = worker.check  # `/readyz` reports the supervised worker
    config = uvicorn.Config(
        app, host=host, port=port, timeout_graceful_shutdown=GRACEFUL_S,
        log_config=None, access_log=False,  # our logging; the API logs its own access lines
    )  # fmt: skip
    uvicorn.Server(config).run()
