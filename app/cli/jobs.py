"""`detox jobs submit|show|watch|list|cancel`: clients of the API's /v1/jobs (DETOX_URL)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from app.cli.client import ApiError, DetoxClient, Unreachable
from app.cli.options import AllCasesOpt, CaseOpt
from app.cli.output import (
    console,
    fail_on_api_error,
    fail_on_bad_input,
    parse_params_json,
    print_json,
    stdout,
)
from app.ml.safeedit import load_instances, select_cases
from app.settings import get_settings

app = typer.Typer(help="Edit jobs on a detox server (at DETOX_URL).", no_args_is_help=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="print only JSON on stdout")]
JobId = Annotated[str, typer.Argument(help="the job's id")]
RECONNECT_S = 120.0  # how long `--watch` waits for a server that went away
RETRYABLE_STATUSES = (502, 503, 504)


def client() -> DetoxClient:
    return DetoxClient.from_settings(get_settings())


@app.command()
def submit(
    file: Annotated[Path, typer.Argument(help="SafeEdit instances (JSON list or JSON Lines)")],
    case: CaseOpt = None,
    every: AllCasesOpt = False,
    parent: Annotated[str, typer.Option(help='"base", a version name or "latest"')] = "base",
    name: Annotated[str | None, typer.Option(help="name of the new version")] = None,
    params: Annotated[str | None, typer.Option(help="DINM params as a JSON object")] = None,
    idempotency_key: Annotated[
        str | None, typer.Option(help="a retry with the same key returns the same job")
    ] = None,
    watch: Annotated[bool, typer.Option("--watch", help="follow the job to its end")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Submit a DINM edit of instances of FILE (one version from all); prints the queued job."""
    with fail_on_bad_input():
        chosen = [
            instance.model_dump(mode="json", by_alias=True)
            for instance in select_cases(load_instances(file), case, every=every)
        ]
        body: dict[str, Any] = {"kind": "dinm", "parent": parent}
        body |= {"instance": chosen[0]} if len(chosen) == 1 else {"instances": chosen}
        body["params"] = parse_params_json(params)
        if name is not None:
            body["name"] = name
    with fail_on_api_error(), client() as api:
        job = api.submit_job(body, idempotency_key=idempotency_key)
        if not as_json:
            console.print(f"submitted job [bold]{job['id']}[/bold]", highlight=False)
        if watch:
            job = follow(api, job["id"], quiet=as_json)
    _show(job, as_json)
    if watch:
        raise typer.Exit(0 if job["status"] == "succeeded" else 1)


@app.command()
def show(job_id: JobId, as_json: JsonOpt = False) -> None:
    """A job's status, stage, progress, version, metrics and error."""
    with fail_on_api_error(), client() as api:
        job = api.get_job(job_id)
    _show(job, as_json)


@app.command()
def watch(job_id: JobId, as_json: JsonOpt = False) -> None:
    """Follow a job with a live progress bar; exit 0 when it succeeds, 1 when it does not."""
    with fail_on_api_error(), client() as api:
        job = follow(api, job_id, quiet=as_json)
    _show(job, as_json)
    raise typer.Exit(0 if job["status"] == "succeeded" else 1)


@app.command(name="list")
def list_jobs(
    status: Annotated[str | None, typer.Option(help="queued|running|succeeded|...")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="jobs per page")] = 20,
    cursor: Annotated[str | None, typer.Option(help="next_cursor of the previous page")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Jobs, newest first."""
    with fail_on_api_error(), client() as api:
        page = api.list_jobs(status=status, limit=limit, cursor=cursor)
    if as_json:
        print_json(page)
        return
    table = Table(box=None, pad_edge=False, padding=(0, 1), header_style="bold")
    table.add_column("id", no_wrap=True, min_width=36)  # whole: ids are copied from here
    table.add_column("status", no_wrap=True)
    table.add_column("stage")
    table.add_column("version")
    table.add_column("created", no_wrap=True)
    for job in page["data"]:
        stage = job["stage"] or ""
        if job["status"] == "running":
            stage = f"{stage} {job['progress']:.0%}"
        created = job["created_at"][5:16].replace("T", " ")  # MM-DD HH:MM (UTC)
        table.add_row(job["id"], _status(job["status"]), stage, job["version"] or "", created)
    stdout.print(table)
    if page["next_cursor"]:
        console.print(f"more: --cursor {page['next_cursor']}", highlight=False)


@app.command()
def cancel(job_id: JobId, as_json: JsonOpt = False) -> None:
    """Cancel a job: a queued one at once, a running one at its next step."""
    with fail_on_api_error(), client() as api:
        job = api.cancel_job(job_id)
    _show(job, as_json)


def follow(api: DetoxClient, job_id: str, *, quiet: bool) -> dict[str, Any]:
    """The job's final JSON, read from its event stream (reconnecting if the stream breaks)."""
    bar = Progress(
        TextColumn("{task.description:<24}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=quiet,
    )
    task = bar.add_task("waiting", total=1.0)
    gone_since: float | None = None  # when the server stopped answering
    with bar:
        while True:
            try:
                for event, job in api.job_events(job_id):
                    gone_since = None
                    stage = job["stage"] or job["status"]
                    bar.update(task, description=stage, completed=job["progress"])
                    if event == "done":
                        return job
                job = api.get_job(job_id)  # the stream ended without `done`: look again
                if job["status"] in ("succeeded", "failed", "cancelled"):
                    return job
            except (Unreachable, ApiError) as exc:
                if isinstance(exc, ApiError) and exc.status not in RETRYABLE_STATUSES:
                    raise
                # The server is restarting or briefly unavailable: the job goes on without us.
                gone_since = gone_since or time.monotonic()
                if time.monotonic() - gone_since > RECONNECT_S:
                    raise
                bar.update(task, description="reconnecting")
                time.sleep(1.0)


def _status(status: str) -> str:
    color = {"succeeded": "green", "failed": "red", "cancelled": "yellow"}.get(status, "cyan")
    return f"[{color}]{status}[/{color}]"


def _show(job: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(job)
        return
    table = Table(show_header=False, box=None)
    for key in ("id", "kind", "status", "stage", "progress", "parent", "version", "attempts"):
        value = job[key]
        if key == "status":
            value = _status(value)
            if job.get("cancel_requested") and job["status"] in ("queued", "running"):
                value += " [yellow](cancel requested)[/yellow]"
        elif key == "progress":
            value = f"{value:.0%}"
        table.add_row(key, "" if value is None else str(value))
    for key in ("created_at", "started_at", "finished_at"):
        table.add_row(key, job[key] or "")
    if job["error"]:
        table.add_row("error", f"[red]{job['error'].get('message', job['error'])}[/red]")
    after = (job["metrics"] or {}).get("metrics", {}).get("after") or {}
    if after:
        table.add_row("after", ", ".join(f"{k} {v:.1f}" for k, v in after.items() if _num(v)))
    stdout.print(table)


def _num(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
