"""`detox keys create|list|revoke`: clients of the API's /v1/keys (needs an admin key in
DETOX_API_KEY). A new key is printed once: the server keeps only its hash."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from app.cli.client import DetoxClient
from app.cli.output import console, fail_on_api_error, print_json, stdout
from app.settings import get_settings

app = typer.Typer(help="API keys on a detox server (admin).", no_args_is_help=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="print only JSON on stdout")]
ROLES = ("reader", "editor", "admin")


def client() -> DetoxClient:
    return DetoxClient.from_settings(get_settings())


@app.command()
def create(
    name: Annotated[str, typer.Argument(help="who or what will use the key")],
    role: Annotated[
        str, typer.Option(help="reader (generate, read), editor (+ jobs, corpora), admin")
    ] = "reader",
    as_json: JsonOpt = False,
) -> None:
    """Create a key. It is shown this once: store it (e.g. as DETOX_API_KEY)."""
    if role not in ROLES:
        console.print(f"[red]error:[/red] --role must be one of {', '.join(ROLES)}, not {role!r}")
        raise typer.Exit(2)
    with fail_on_api_error(), client() as api:
        key = api.create_key(name, role)
    if as_json:
        print_json(key)
        return
    console.print(
        f"created {key['role']} key {key['id']} ({key['name']}); it is shown only now:",
        highlight=False,
    )
    stdout.print(key["key"], highlight=False, soft_wrap=True)


@app.command(name="list")
def list_keys(
    include_revoked: Annotated[bool, typer.Option("--all", help="include revoked keys")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Keys (never the keys themselves: their first characters)."""
    with fail_on_api_error(), client() as api:
        page = api.list_keys(include_revoked=include_revoked)
    if as_json:
        print_json(page)
        return
    table = Table("id", "name", "role", "prefix", "created", "revoked")
    for key in page["data"]:
        table.add_row(
            str(key["id"]),
            key["name"],
            key["role"],
            f"{key['prefix']}..." if key["prefix"] else "",
            key["created_at"][:19].replace("T", " "),
            (key["revoked_at"] or "")[:19].replace("T", " "),
        )
    stdout.print(table)


@app.command()
def revoke(
    key_id: Annotated[int, typer.Argument(help="the key's id (see `detox keys list`)")],
    as_json: JsonOpt = False,
) -> None:
    """Revoke a key: it stops working at once on this server (within DETOX_AUTH_CACHE_S on
    other API processes)."""
    with fail_on_api_error(), client() as api:
        key = api.revoke_key(key_id)
    if as_json:
        print_json(key)
    else:
        stdout.print(f"revoked key {key['id']} ({key['name']})", highlight=False)
