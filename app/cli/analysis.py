"""`detox bias` and `detox perplexity`: analyses of a model (optionally with a delta applied) run
in this process, no server. torch is imported only when a command runs."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from app.cli.output import fail_on_bad_input, print_json, stage_progress, stdout
from app.ml.errors import InputError
from app.ml.text_files import parse_json, read_text_file
from app.settings import Settings, get_settings

ModelOpt = Annotated[
    str | None, typer.Option("--model", help='"demo", a model folder, a .gguf file or a hub id')
]
DeltaOpt = Annotated[Path | None, typer.Option(help="a delta.safetensors to apply first")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print only the JSON report on stdout")]
_BLANK_LINES = re.compile(r"\r?\n[ \t]*\r?\n")  # paragraph breaks of a .txt file


def bias(
    model: ModelOpt = None,
    delta: DeltaOpt = None,
    pairs: Annotated[
        Path | None,
        typer.Option(help="CrowS-Pairs CSV or JSON Lines (default: the packaged CrowS-Pairs)"),
    ] = None,
    types: Annotated[
        str | None, typer.Option(help="comma-separated bias types, e.g. gender,race-color")
    ] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="the first N pairs per type")] = None,
    as_json: JsonOpt = False,
) -> None:
    """CrowS-Pairs-style bias scores per bias type (50 = no preference for the stereotype)."""
    settings = get_settings()
    with fail_on_bad_input():
        report = run_bias(
            settings, model=model or settings.model, delta=delta, pairs=pairs, types=types,
            limit=limit, quiet=as_json,
        )  # fmt: skip
    if as_json:
        print_json(report)
    else:
        print_bias_report(report)


def perplexity(
    model: ModelOpt = None,
    delta: DeltaOpt = None,
    file: Annotated[
        Path | None,
        typer.Option(
            help=".txt (paragraphs split by blank lines), .json list of strings or .jsonl with "
            '"text" (default: the packaged reference text)'
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Perplexity of a model on reference text."""
    settings = get_settings()
    with fail_on_bad_input():
        texts = read_texts(file) if file else None
        report = run_perplexity(
            settings, model=model or settings.model, delta=delta, file=file, texts=texts,
            quiet=as_json,
        )  # fmt: skip
    if as_json:
        print_json(report)
    else:
        stdout.print(
            f"perplexity {report['perplexity']:.3f} of {report['model']} over "
            f"{report['tokens']} tokens in {report['texts']} texts",
            highlight=False,
        )


def register(app: typer.Typer) -> None:
    app.command()(bias)
    app.command()(perplexity)


def run_bias(
    settings: Settings,
    *,
    model: str,
    delta: Path | None,
    pairs: Path | None,
    types: str | None,
    limit: int | None,
    quiet: bool,
) -> dict[str, Any]:
    from app.cli.local import _load, _read_delta
    from app.ml.bias import bias_scores, filter_pairs, load_pairs
    from app.ml.deltas import applied

    # Read every input before the (slow) model load, so that bad input fails at once.
    chosen = filter_pairs(load_pairs(pairs), types=types, limit=limit)
    if not chosen:
        raise InputError("--types: no bias type given")
    deltas = [_read_delta(delta)] if delta else []
    lm = _load(settings, model, quiet=quiet)
    with stage_progress(quiet=quiet) as progress, applied(lm.model, deltas):
        scores = bias_scores(  # two sentences per pair: eval_batch_size pairs per forward
            lm, chosen, batch_size=2 * settings.eval_batch_size,
            progress=lambda fraction: progress("bias", fraction),
        )  # fmt: skip
    return {
        "model": model,
        "delta": str(delta) if delta else None,
        "pairs": str(pairs) if pairs else "packaged CrowS-Pairs",
        "limit": limit,
        **scores,
    }


def run_perplexity(
    settings: Settings,
    *,
    model: str,
    delta: Path | None,
    file: Path | None,
    texts: list[str] | None,
    quiet: bool,
) -> dict[str, Any]:
    from app.cli.local import _load, _read_delta
    from app.ml.deltas import applied
    from app.ml.perplexity import perplexity as measure

    deltas = [_read_delta(delta)] if delta else []
    lm = _load(settings, model, quiet=quiet)
    with applied(lm.model, deltas):
        result = measure(lm, texts, batch_size=settings.eval_batch_size)
    return {
        "model": model,
        "delta": str(delta) if delta else None,
        "file": str(file) if file else None,
        **result,
    }


def read_texts(path: Path) -> list[str]:
    """Texts of a .txt (paragraphs split by blank lines), .json (list of strings) or .jsonl
    (objects with "text") file."""
    content = read_text_file(path)
    if path.suffix == ".json":
        texts = _json_texts(path, content)
    elif path.suffix == ".jsonl":
        texts = _jsonl_texts(path, content)
    else:
        texts = [p.strip() for p in _BLANK_LINES.split(content) if p.strip()]
    if not texts:
        raise InputError(f"{path}: contains no text")
    return texts


def _json_texts(path: Path, content: str) -> list[str]:
    data = parse_json(content, str(path))
    if not isinstance(data, list) or not all(isinstance(item, str) for item in data):
        raise InputError(f"{path}: must be a JSON list of strings")
    return [text for text in data if text.strip()]


def _jsonl_texts(path: Path, content: str) -> list[str]:
    texts = []
    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}: line {number}: invalid JSON: {exc.msg}") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise InputError(f"{path}: line {number}: must be an object with a string 'text'")
        texts.append(record["text"])
    return texts


def print_bias_report(report: dict[str, Any]) -> None:
    title = f"bias of {report['model']}" + (f" + {report['delta']}" if report["delta"] else "")
    table = Table(title=title, caption="CrowS-Pairs style: 50 = no preference for stereotypes")
    table.add_column("bias type")
    table.add_column("n", justify="right")
    table.add_column("shared", justify="right")
    table.add_column("sentence", justify="right")
    for name, row in report["by_type"].items():
        table.add_row(name, str(row["n"]), _fmt(row["score"]), _fmt(row["sentence_score"]))
    table.add_row(
        "[bold]all[/bold]",
        str(report["n"]),
        _fmt(report["overall"]),
        _fmt(report["sentence_overall"]),
    )
    stdout.print(table)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"
