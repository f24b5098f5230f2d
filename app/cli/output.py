"""How the CLI talks: JSON on stdout, everything human on stderr, one line for bad input."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from app.cli.client import ApiError, ClientError
from app.ml.errors import DetoxError, InputError

# Human output goes to stderr so that `--json` leaves stdout to the report alone.
console = Console(stderr=True)
stdout = Console()


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


@contextmanager
def fail_on_bad_input() -> Iterator[None]:
    """Bad input ends the command with one line naming the problem and exit status 2."""
    try:
        yield
    except InputError as exc:
        console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except DetoxError as exc:  # not the input's fault (e.g. a model could not be fetched)
        console.print(f"[red]failed:[/red] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None


def parse_params_json(text: str | None) -> dict:
    """`--params '{"lr": 1e-3}'` as a dict (InputError for anything but a JSON object)."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"--params: invalid JSON: {exc.msg}") from None
    if not isinstance(value, dict):
        raise InputError("--params: must be a JSON object")
    return value


@contextmanager
def fail_on_api_error() -> Iterator[None]:
    """An API error ends the command with the envelope's message in one line: exit status 2 for
    a 4xx (the request was wrong), 1 otherwise (server error, server unreachable)."""
    try:
        yield
    except ApiError as exc:
        where = f" ({exc.param})" if exc.param and exc.param not in exc.message else ""
        console.print(f"[red]error:[/red] {exc.message}{where}", highlight=False, soft_wrap=True)
        raise typer.Exit(2 if exc.is_input_error else 1) from None
    except ClientError as exc:
        console.print(f"[red]failed:[/red] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None


@contextmanager
def stage_progress(*, quiet: bool) -> Iterator[Callable[[str, float], None]]:
    """A progress bar fed by (stage, fraction) callbacks; silent when `quiet`."""
    if quiet:
        yield lambda _stage, _fraction: None
        return
    bar = Progress(
        TextColumn("{task.description:<12}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )
    task = bar.add_task("starting", total=1.0)
    with bar:
        yield lambda stage, fraction: bar.update(task, description=stage, completed=fraction)
