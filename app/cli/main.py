"""`detox`: local edits, evaluation and judging (no server), the service processes (`api`,
`worker`, `up`) and the API's clients (`jobs`, `versions`, `corpora`, `experiments`, `chat`, `ab`).

`app.cli.local` (torch) is imported only by the commands that need it, so clients start fast.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from app.cli import (
    analysis,
    corpora,
    experiments,
    generation,
    jobs,
    judging,
    keys,
    service,
    versions,
)
from app.cli.options import AllCasesOpt, CaseOpt
from app.cli.output import fail_on_bad_input, parse_params_json, print_json
from app.settings import get_settings

app = typer.Typer(
    name="detox",
    help="Detoxify LLMs by editing their weights, and serve the versions.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ModelOpt = Annotated[
    str | None, typer.Option("--model", help='"demo", a model folder, a .gguf file or a hub id')
]
JudgeOpt = Annotated[
    str | None,
    typer.Option(
        help='"offline" (the newest: offline/3), "offline/2", "offline/1" or '
        '"hf:<model id or path>"'
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="print only the JSON report on stdout")]
TokensOpt = Annotated[int | None, typer.Option(help="new tokens per evaluated answer")]


@app.command()
def dinm(
    file: Annotated[Path, typer.Argument(help="SafeEdit instances (JSON list or JSON Lines)")],
    case: CaseOpt = None,
    every: AllCasesOpt = False,
    out: Annotated[
        Path | None, typer.Option(help="folder for delta.safetensors + report.json")
    ] = None,
    model: ModelOpt = None,
    judge: JudgeOpt = None,
    preset: Annotated[
        str | None,
        typer.Option(
            help='"broad" (default: one joint edit that teaches refusing harm in general), '
            '"contrastive", "selective", "guarded" or "paper"; flags override it'
        ),
    ] = None,
    steps: Annotated[int | None, typer.Option(help="tuning steps (from the preset)")] = None,
    lr: Annotated[float | None, typer.Option(help="learning rate (from the preset)")] = None,
    layer: Annotated[int | None, typer.Option(help="edit this layer instead of locating")] = None,
    rank: Annotated[
        int | None,
        typer.Option(
            help="each projection's update of this rank (default: the preset's; a full-rank "
            "update: --params '{\"rank\": null}')"
        ),
    ] = None,
    params: Annotated[str | None, typer.Option(help="more DINM params as a JSON object")] = None,
    max_new_tokens: TokensOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """One DINM edit from one instance (or several: one delta), with SafeEdit metrics before and
    after."""
    from app.cli import local

    settings = get_settings()
    with fail_on_bad_input():
        overrides = parse_params_json(params)
        flags = {"preset": preset, "steps": steps, "lr": lr, "layer": layer, "rank": rank}
        overrides |= {k: v for k, v in flags.items() if v is not None}
        report = local.run_dinm(
            settings,
            file=file,
            cases=case,
            every=every,
            out=out,
            model=model or settings.model,
            judge=judge or settings.judge,
            params=overrides,
            max_new_tokens=max_new_tokens or settings.max_new_tokens,
            quiet=as_json,
        )
    if as_json:
        print_json(report)
    else:
        local.print_dinm_report(report, out)


@app.command(name="eval")
def evaluate(
    file: Annotated[Path, typer.Argument(help="SafeEdit instances (JSON list or JSON Lines)")],
    model: ModelOpt = None,
    delta: Annotated[Path | None, typer.Option(help="a delta.safetensors to apply first")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="evaluate the first N instances")] = None,
    judge: JudgeOpt = None,
    max_new_tokens: TokensOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """SafeEdit metrics (DS, DG_*, fluency, over-refusal) of a model over a file."""
    from app.cli import local

    settings = get_settings()
    with fail_on_bad_input():
        report = local.run_eval(
            settings,
            file=file,
            model=model or settings.model,
            delta=delta,
            limit=limit,
            judge=judge or settings.judge,
            max_new_tokens=max_new_tokens or settings.max_new_tokens,
            quiet=as_json,
        )
    if as_json:
        print_json(report)
    else:
        local.print_eval_report(report)


@app.command()
def unlearn(
    file: Annotated[
        Path, typer.Argument(help="forget corpus: JSON Lines of {text, harmful_spans}")
    ],
    retain: Annotated[
        Path | None, typer.Option(help="retain corpus (default: the packaged benign set)")
    ] = None,
    method: Annotated[str, typer.Option(help="masked_ga | ga | graddiff | npo")] = "masked_ga",
    out: Annotated[
        Path | None, typer.Option(help="folder for delta.safetensors + report.json")
    ] = None,
    model: ModelOpt = None,
    scope: Annotated[str | None, typer.Option(help='"lora" (default) or "dense"')] = None,
    steps: Annotated[int | None, typer.Option(help="optimiser steps")] = None,
    lr: Annotated[float | None, typer.Option(help="learning rate")] = None,
    params: Annotated[str | None, typer.Option(help="more unlearning params as JSON")] = None,
    bias_pairs: Annotated[
        int, typer.Option(min=0, help="CrowS-Pairs pairs per bias type before/after (0: none)")
    ] = 50,
    as_json: JsonOpt = False,
) -> None:
    """Unlearn the harmful spans of a corpus locally, with perplexity and bias before/after."""
    from app.cli import local

    settings = get_settings()
    with fail_on_bad_input():
        overrides = parse_params_json(params)
        flags = {"scope": scope, "steps": steps, "lr": lr}
        overrides |= {k: v for k, v in flags.items() if v is not None}
        report = local.run_unlearn(
            settings, file=file, retain=retain, method=method, out=out,
            model=model or settings.model, params=overrides, bias_pairs=bias_pairs,
            quiet=as_json,
        )  # fmt: skip
    if as_json:
        print_json(report)
    else:
        local.print_unlearn_report(report, out)


service.register(app)
generation.register(app)
analysis.register(app)
judging.register(app)
app.add_typer(jobs.app, name="jobs")
app.add_typer(versions.app, name="versions")
app.add_typer(corpora.app, name="corpora")
app.add_typer(keys.app, name="keys")
app.add_typer(experiments.app, name="experiments")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
