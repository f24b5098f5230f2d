"""`detox corpora upload|list|show|delete`: clients of the API's /v1/corpora (DETOX_URL).

A corpus is JSON Lines, one document a line: `{"text", "harmful_spans"?: [[start, end], ...],
"id"?}` or a bare string. The server validates it line by line; `detox jobs` and the API's
unlearning jobs then name it by id or name (`corpus_id`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from app.cli.client import DetoxClient
from app.cli.output import fail_on_api_error, fail_on_bad_input, print_json, stdout
from app.ml.errors import InputError
from app.settings import get_settings

app = typer.Typer(help="Unlearning corpora (JSON Lines) on a detox server.", no_args_is_help=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="print only JSON on stdout")]
IdOrName = Annotated[str, typer.Argument(help="the corpus's id or name")]
FIELDS = ("id", "name", "documents", "annotated", "bytes", "sha256", "created_at")


def client() -> DetoxClient:
    return DetoxClient.from_settings(get_settings())


@app.command()
def upload(
    file: Annotated[Path, typer.Argument(help="JSON Lines, one document a line")],
    name: Annotated[str | None, typer.Option(help="a unique name to refer to it by")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Upload a corpus (streamed; the server checks every line and names the first bad one)."""
    with fail_on_bad_input():
        if not file.is_file():
            raise InputError(f"no corpus file at {file}")
    with fail_on_api_error(), client() as api:
        corpus = api.upload_corpus(file, name=name)
    if as_json:
        print_json(corpus)
        return
    label = f" ({corpus['name']})" if corpus["name"] else ""
    stdout.print(
        f"uploaded corpus {corpus['id']}{label}: {corpus['documents']} documents, "
        f"{corpus['annotated']} with harmful spans, {corpus['bytes']:,} bytes",
        highlight=False,
        soft_wrap=True,
    )


@app.command(name="list")
def list_corpora(
    limit: Annotated[int, typer.Option(min=1, max=1000, help="corpora to list")] = 100,
    as_json: JsonOpt = False,
) -> None:
    """Corpora, newest first ("spans": documents with explicit harmful spans)."""
    with fail_on_api_error(), client() as api:
        page = api.list_corpora(limit=limit)
    if as_json:
        print_json(page)
        return
    table = Table(box=None, pad_edge=False, padding=(0, 1), header_style="bold")
    table.add_column("id", no_wrap=True, min_width=36)  # whole: ids are copied from here
    table.add_column("name", overflow="fold")
    for column in ("docs", "spans", "bytes", "created"):
        table.add_column(column, no_wrap=True, justify="left" if column == "created" else "right")
    for corpus in page["data"]:
        table.add_row(
            corpus["id"],
            corpus["name"] or "",
            str(corpus["documents"]),
            str(corpus["annotated"]),
            f"{corpus['bytes']:,}",
            corpus["created_at"][5:16].replace("T", " "),  # MM-DD HH:MM (UTC)
        )
    stdout.print(table)


@app.command()
def show(id_or_name: IdOrName, as_json: JsonOpt = False) -> None:
    """One corpus: documents, annotated documents, size and checksum."""
    with fail_on_api_error(), client() as api:
        corpus = api.get_corpus(id_or_name)
    _show(corpus, as_json)


@app.command()
def delete(id_or_name: IdOrName) -> None:
    """Delete a corpus (refused while a queued or running job uses it)."""
    with fail_on_api_error(), client() as api:
        api.delete_corpus(id_or_name)
    stdout.print(f"deleted corpus {id_or_name}", highlight=False)


def _show(corpus: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(corpus)
        return
    table = Table(show_header=False, box=None)
    for key in FIELDS:
        value = corpus[key]
        table.add_row(key, "" if value is None else str(value))
    stdout.print(table)
