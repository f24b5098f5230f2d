"""`detox judge`: a safety judge's verdicts on responses from a JSON Lines file, no server.

With `--json`, stdout is one JSON line per judged line, in order, `{"refused", "unsafe",
"score"}`, and the summary goes to stderr; otherwise a table and the summary. The whole file is
checked before anything is judged, so a bad line leaves stdout empty (exit status 2).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from app.cli.output import console, fail_on_bad_input, stdout
from app.ml.judge_file import JudgeItem, read_items
from app.settings import get_settings

if TYPE_CHECKING:
    from app.ml.judges import Judge, Verdict


def judge(
    file: Annotated[
        Path,
        typer.Argument(help='JSON Lines: {"prompt": ..., "response": ...[, "harmful": false]}'),
    ],
    judge: Annotated[
        str | None,
        typer.Option(
            "--judge",
            help='"offline" (the newest: offline/3), "offline/2", "offline/1" or "hf:<model id>"',
        ),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="one JSON verdict per line on stdout, in order")
    ] = False,
) -> None:
    """Judge each response: refused, unsafe and a score in [0, 1] (higher is less safe)."""
    with fail_on_bad_input():
        items = read_items(file)  # every line is checked before the judge is even loaded
        from app.ml.judges import load_judge

        the_judge = load_judge(judge or get_settings().judge)
        verdicts = judge_items(the_judge, items)
    summary = _summary(the_judge.name, items, verdicts)
    if as_json:
        lines = [
            json.dumps({"refused": v.refused, "unsafe": v.unsafe, "score": round(v.score, 6)})
            for v in verdicts
        ]
        sys.stdout.write("".join(line + "\n" for line in lines))
        console.print(summary, highlight=False, soft_wrap=True)
        return
    _print_table(the_judge.name, items, verdicts)
    stdout.print(summary, highlight=False, soft_wrap=True)


def judge_items(the_judge: Judge, items: list[JudgeItem]) -> list[Verdict]:
    """The verdict on each item, in order (harmful and benign items judged as such)."""
    verdicts: dict[int, Verdict] = {}
    for harmful in (True, False):
        group = [(i, item) for i, item in enumerate(items) if item.harmful is harmful]
        if not group:
            continue
        found = the_judge.judge(
            [item.prompt for _, item in group],
            [item.response for _, item in group],
            harmful=harmful,
        )
        verdicts.update({i: v for (i, _), v in zip(group, found, strict=True)})
    return [verdicts[i] for i in range(len(items))]


def _summary(name: str, items: list[JudgeItem], verdicts: list[Verdict]) -> str:
    harmful = sum(item.harmful for item in items)
    refused = sum(v.refused for v in verdicts)
    unsafe = sum(v.unsafe for v in verdicts)
    return (
        f"judge {name}: {len(items)} responses ({harmful} to harmful prompts, "
        f"{len(items) - harmful} to benign ones); {refused} refused, {unsafe} unsafe"
    )


def _print_table(name: str, items: list[JudgeItem], verdicts: list[Verdict]) -> None:
    table = Table(title=f"judge {name}")
    table.add_column("line", justify="right")
    table.add_column("prompt")
    table.add_column("refused")
    table.add_column("unsafe")
    table.add_column("score", justify="right")
    table.add_column("response", overflow="fold")
    for item, verdict in zip(items, verdicts, strict=True):
        table.add_row(
            str(item.line),
            "harmful" if item.harmful else "benign",
            "yes" if verdict.refused else "no",
            "[red]yes[/red]" if verdict.unsafe else "no",
            f"{verdict.score:.3f}",
            _shorten(item.response),
        )
    stdout.print(table)


def _shorten(text: str, limit: int = 120) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def register(app: typer.Typer) -> None:
    app.command(name="judge")(judge)
