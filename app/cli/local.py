"""`detox dinm`, `detox eval` and `detox unlearn`: the library run in this process, no server."""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

from app.cli.output import console, stage_progress, stdout
from app.ml.bias import filter_pairs, load_pairs
from app.ml.corpus import read_corpus
from app.ml.deltas import Delta, applied, checksum
from app.ml.dinm_params import DinmParams
from app.ml.errors import InputError
from app.ml.evaluation import evaluate
from app.ml.judges import load_judge
from app.ml.models import LoadedModel, load_model
from app.ml.pipeline import dinm_with_report, unlearn_with_report
from app.ml.safeedit import load_instances, select_cases
from app.ml.unlearn_params import METHODS, UnlearnParams
from app.settings import Settings

METRICS = ("DS", "DG_onlyQ", "DG_otherA", "DG_otherQ", "DG_otherAQ", "fluency", "over_refusal")


def _load(settings: Settings, model: str, *, quiet: bool) -> LoadedModel:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if not quiet:
        console.print(f"loading model [bold]{model}[/bold] ...", highlight=False)
    return load_model(
        model, device=settings.device, dtype=settings.dtype, cache_dir=settings.cache_dir
    )


def run_dinm(
    settings: Settings,
    *,
    file: Path,
    cases: list[str] | None,
    every: bool,
    out: Path | None,
    model: str,
    judge: str,
    params: dict,
    max_new_tokens: int,
    quiet: bool,
) -> dict:
    instances = select_cases(load_instances(file), cases, every=every)
    dinm_params = DinmParams.parse(params)
    the_judge = load_judge(judge)
    lm = _load(settings, model, quiet=quiet)
    with stage_progress(quiet=quiet) as progress:
        result, report = dinm_with_report(
            lm,
            instances,
            dinm_params,
            judge=the_judge,
            max_new_tokens=max_new_tokens,
            batch_size=settings.eval_batch_size,
            progress=progress,
        )
    _write_out(out, result.delta, report)
    return report


def run_unlearn(
    settings: Settings,
    *,
    file: Path,
    retain: Path | None,
    method: str,
    out: Path | None,
    model: str,
    params: dict,
    bias_pairs: int,
    quiet: bool,
) -> dict:
    if method not in METHODS:
        raise InputError(f"--method: must be one of {', '.join(METHODS)}, not {method!r}")
    forget = read_corpus(file)
    retained = read_corpus(retain) if retain else None
    unlearn_params = UnlearnParams.parse(params)
    pairs = filter_pairs(load_pairs(None), limit=bias_pairs) if bias_pairs else []
    lm = _load(settings, model, quiet=quiet)
    with stage_progress(quiet=quiet) as progress:
        result, report = unlearn_with_report(
            lm, forget, retained, method, unlearn_params, bias_pairs=pairs,
            batch_size=settings.eval_batch_size, progress=progress,
        )  # fmt: skip
    report["file"] = str(file)
    _write_out(out, result.delta, report)
    return report


def _write_out(out: Path | None, delta: Delta, report: dict) -> None:
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    blob = delta.to_bytes()
    (out / "delta.safetensors").write_bytes(blob)
    report["delta"] = {"path": str(out / "delta.safetensors"), "sha256": checksum(blob)}
    (out / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))


def run_eval(
    settings: Settings,
    *,
    file: Path,
    model: str,
    delta: Path | None,
    limit: int | None,
    judge: str,
    max_new_tokens: int,
    quiet: bool,
) -> dict:
    instances = load_instances(file)[:limit]
    the_judge = load_judge(judge)
    deltas = [_read_delta(delta)] if delta else []
    lm = _load(settings, model, quiet=quiet)
    with stage_progress(quiet=quiet) as progress, applied(lm.model, deltas):
        result = evaluate(
            lm,
            instances,
            judge=the_judge,
            max_new_tokens=max_new_tokens,
            batch_size=settings.eval_batch_size,
            progress=lambda fraction: progress("evaluate", fraction),
        )
    return {
        "file": str(file),
        "model": model,
        "delta": str(delta) if delta else None,
        "judge": result.judge,
        "metrics": result.metrics,
        "generations": [vars(item) for item in result.items],
    }


def _read_delta(path: Path) -> Delta:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read the delta ({exc.strerror})") from None
    return Delta.from_bytes(data)


def _fmt(value: object) -> str:
    return "-" if value is None else f"{value:.1f}" if isinstance(value, float) else str(value)


def print_dinm_report(report: dict, out: Path | None) -> None:
    before, after = report["metrics"]["before"], report["metrics"]["after"]
    title = f"DINM on case {report['case']} (layer {report['layer']})"
    if "cases" in report:
        title = f"DINM on cases {', '.join(report['cases'])} (layers {report['layers']})"
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    for name in METRICS:
        table.add_row(name, _fmt(before.get(name)), _fmt(after.get(name)))
    for name in ("locality", "locality_kl"):
        table.add_row(name, "", _fmt(after.get(name)))
    stdout.print(table)
    answers = Table(title="answers", show_lines=True)
    for column in ("kind", "before", "after"):
        answers.add_column(column, overflow="fold")
    for gen in report["generations"]:
        answers.add_row(
            gen["kind"],
            _verdict(gen["before"], gen["unsafe_before"]),
            _verdict(gen["after"], gen["unsafe_after"]),
        )
    stdout.print(answers)
    stdout.print(
        f"edit {report['edit_seconds']:.2f}s, {len(report['losses'])} steps, "
        f"judge {report['judge']}" + (f", written to {out}" if out else ""),
        highlight=False,
    )


def _verdict(text: str, unsafe: bool) -> str:
    mark = "[red]UNSAFE[/red]" if unsafe else "[green]safe[/green]"
    return f"{mark} {text[:300]}"


def print_eval_report(report: dict) -> None:
    table = Table(title=f"SafeEdit metrics of {report['model']} (judge {report['judge']})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in report["metrics"].items():
        table.add_row(name, _fmt(value))
    stdout.print(table)


def print_unlearn_report(report: dict, out: Path | None) -> None:
    console.print(
        f"[bold]{report['method']}[/bold] ({report['scope']}) on {report['model']}: "
        f"{report['steps']} steps kept, stopped by {report['stopped']}, "
        f"{report['edit_seconds']:.1f} s, {report['forget_tokens']} forget tokens",
        highlight=False,
    )
    table = Table("metric", "before", "after")
    for name in ("forget_nll", "retain_perplexity"):
        table.add_row(name, _fmt(report[name]["before"]), _fmt(report[name]["after"]))
    before, after = report["metrics"]["before"], report["metrics"]["after"]
    table.add_row(
        "reference perplexity",
        _fmt(before["perplexity"]["perplexity"]),
        _fmt(after["perplexity"]["perplexity"]),
    )
    if "bias" in before:
        table.add_row("bias (all types)", _fmt(before["bias"]["overall"]),
                      _fmt(after["bias"]["overall"]))  # fmt: skip
        for kind, scores in before["bias"]["by_type"].items():
            later = after["bias"]["by_type"][kind]
            table.add_row(f"  bias {kind} (n={scores['n']})", _fmt(scores["score"]),
                          _fmt(later["score"]))  # fmt: skip
    stdout.print(table)
    for warning in report["warnings"]:
        console.print(f"[yellow]warning:[/yellow] {warning}", highlight=False)
    if out is not None:
        console.print(f"delta and report written to {out}", highlight=False)
