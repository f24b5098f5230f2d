"""`detox versions list|show|export|retire`: clients of the API's /v1/versions (DETOX_URL)."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from app.cli.client import DetoxClient
from app.cli.output import fail_on_api_error, fail_on_bad_input, print_json, stdout
from app.cli.unpack import safetensors_metadata, unpack_tar
from app.ml.errors import InputError
from app.settings import get_settings

app = typer.Typer(help="Versions (weight deltas) on a detox server.", no_args_is_help=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="print only JSON on stdout")]
Name = Annotated[str, typer.Argument(help='a version name, or "latest"')]
FORMATS = ("peft", "merged", "delta")
REPORT_FILE = "detox_export.json"  # what the server writes beside an exported folder's files


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
def export(
    name: Name,
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            help="peft (a LoRA adapter folder), merged (a Hugging Face model folder) or delta "
            "(the chain summed into one safetensors file)",
        ),
    ],
    out: Annotated[
        Path, typer.Option(help="peft, merged: a new or empty folder; delta: the file to write")
    ],
    max_rel_error: Annotated[
        float | None,
        typer.Option(help="peft: the relative error a dense update's SVD may leave (1e-3)"),
    ] = None,
    max_rank: Annotated[
        int | None, typer.Option(help="peft: the highest LoRA rank of any module")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Download a version (with its whole chain) as a PEFT LoRA adapter, a merged model, or one
    summed delta; peft and merged are unpacked into the folder --out."""
    with fail_on_bad_input():
        _check_out(fmt, out)
    with fail_on_api_error(), client() as api:
        if fmt == "delta":
            files, report = _download_delta(api, name, out, max_rel_error, max_rank)
        else:
            files, report = _download_folder(api, name, fmt, out, max_rel_error, max_rank)
    summary = {
        "name": report.get("version", name),
        "format": fmt,
        "path": str(out),
        "files": [out.name] if fmt == "delta" else sorted(str(f.relative_to(out)) for f in files),
        "bytes": sum(f.stat().st_size for f in files),
        "report": report,
    }
    if as_json:
        print_json(summary)
        return
    line = f"exported {summary['name']} as {fmt} to {out} ({summary['bytes']:,} bytes)"
    if fmt == "peft":
        line += f"; LoRA r={report.get('r')}, largest relative error {report.get('rel_error'):.2g}"
    stdout.print(line, highlight=False, soft_wrap=True)


def _check_out(fmt: str, out: Path) -> None:
    if fmt not in FORMATS:
        raise InputError(f"--format: choose one of {', '.join(FORMATS)}, not {fmt!r}")
    if fmt == "delta":
        if out.is_dir():
            raise InputError(f"--out: {out} is a folder; a delta export is one file")
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"--out: {out} exists and is not an empty folder")


def _download_delta(
    api: DetoxClient, name: str, out: Path, max_rel_error: float | None, max_rank: int | None
) -> tuple[list[Path], dict[str, Any]]:
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_name(out.name + ".part")
    try:
        with part.open("wb") as handle:
            api.export_version(
                name, fmt="delta", dest=handle, max_rel_error=max_rel_error, max_rank=max_rank
            )
        metadata = safetensors_metadata(part)
        part.replace(out)
    finally:
        part.unlink(missing_ok=True)
    report: dict[str, Any] = {"version": metadata.get("detox.version", name)}
    report["chain"] = json.loads(metadata.get("detox.chain", "[]"))
    return [out], report


def _download_folder(
    api: DetoxClient,
    name: str,
    fmt: str,
    out: Path,
    max_rel_error: float | None,
    max_rank: int | None,
) -> tuple[list[Path], dict[str, Any]]:
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryFile(dir=out) as archive:  # beside the result: room for both
            api.export_version(
                name, fmt=fmt, dest=archive, max_rel_error=max_rel_error, max_rank=max_rank
            )
            archive.seek(0)
            files = unpack_tar(archive, out)
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        else:
            for child in out.iterdir():  # it was empty: leave it so
                if child.is_dir():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        raise
    report_file = out / REPORT_FILE
    report = json.loads(report_file.read_text()) if report_file.exists() else {}
    return files, report


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
