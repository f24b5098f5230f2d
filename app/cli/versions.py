"""`detox versions list|show|retire`: clients of the API's /v1/versions (DETOX_URL)."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from app.cli.client import DetoxClient
from app.cli.output import fail_on_api_error, print_json, stdout
from app.settings import get_settings

app = typer.Typer(help="Versions (weight deltas) on a detox server.", no_args_is_help=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="print only JSON on stdout")]
Name = Annotated[str, typer.Argument(help='a version name, or "latest"')]


def client() -> DetoxClient:
    return DetoxClient.from_settings(get_settings())


@app.command(name="list")
def list_versions(
    include_retired: Annotated[
        bool, typer.Option("--all", help="include retired versions")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Versions, oldest first."""
    with fail_on_api_error(), client() as api:
        page = api.list_versions(include_retired=include_retired)
    if as_json:
        print_json(page)
    else:
        _table(page["data"])


@app.command()
def show(name: Name, as_json: JsonOpt = False) -> None:
    """One version: parent, job, metrics and its delta."""
    with fail_on_api_error(), client() as api:
        version = api.get_version(name)
    if as_json:
        print_json(version)
        return
    table = Table(show_header=False, box=None)
    for key in ("name", "parent", "kind", "job_id", "created_at", "retired"):
        table.add_row(key, str(version[key]))
    delta = version["delta"]
    table.add_row("delta", f"{delta['bytes']:,} bytes, {delta['encoding']}, {delta['sha256'][:16]}")
    for param in delta["params"]:
        table.add_row("", param)
    after = (version["metrics"] or {}).get("metrics", {}).get("after") or {}
    for key, value in after.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            table.add_row(f"after.{key}", f"{value:.2f}")
    stdout.print(table)


@app.command()
def retire(
    name: Name,
    cascade: Annotated[bool, typer.Option("--cascade", help="retire its descendants too")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Retire a version (and with --cascade its live descendants)."""
    with fail_on_api_error(), client() as api:
        retired = api.retire_version(name, cascade=cascade)
    if as_json:
        print_json(retired)
    else:
        names = ", ".join(v["name"] for v in retired["data"])
        stdout.print(f"retired {names}", highlight=False)


def _table(versions: list[dict[str, Any]]) -> None:
    table = Table("name", "parent", "kind", "params", "bytes", "created", "retired")
    for v in versions:
        table.add_row(
            v["name"],
            v["parent"],
            v["kind"],
            str(len(v["delta"]["params"])),
            f"{v['delta']['bytes']:,}",
            v["created_at"][:19].replace("T", " "),
            "yes" if v["retired"] else "",
        )
    stdout.print(table)
