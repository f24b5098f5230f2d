"""`detox experiments create|list|show|results|stop|feedback`: clients of /v1/experiments.

Arms are `MODEL=WEIGHT` (or just `MODEL`, weight 1): `detox experiments create v3-test
--arm base=50 --arm v3=50`; requests then name `exp:v3-test` as their model."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from app.cli.client import DetoxClient
from app.cli.output import console, fail_on_api_error, print_json, stdout
from app.settings import get_settings

app = typer.Typer(help="A/B experiments on live traffic.", no_args_is_help=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="print only JSON on stdout")]
NameArg = Annotated[str, typer.Argument(help="the experiment's name")]


def client() -> DetoxClient:
    return DetoxClient.from_settings(get_settings())


def parse_arm(text: str) -> dict[str, Any]:
    """`MODEL=WEIGHT` or `MODEL` -> {"model", "weight"}; typer.BadParameter when malformed."""
    model, sep, weight = text.partition("=")
    if not model:
        raise typer.BadParameter(f"{text!r}: expected MODEL or MODEL=WEIGHT")
    if not sep:
        return {"model": model, "weight": 1.0}
    try:
        return {"model": model, "weight": float(weight)}
    except ValueError:
        raise typer.BadParameter(f"{text!r}: the weight must be a number") from None


@app.command()
def create(
    name: NameArg,
    arm: Annotated[
        list[str], typer.Option("--arm", help="MODEL=WEIGHT, repeated: base=50 --arm v3=50")
    ],
    judge: Annotated[
        str,
        typer.Option(
            help='"service" (the server\'s judge), "offline" (the newest offline judge, stored '
            'as "offline/3"), "offline/2", "offline/1" or "none"'
        ),
    ] = "service",
    keep_text: Annotated[
        bool, typer.Option(help="store prompts and responses with their outcomes")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Start an experiment; requests with model `exp:NAME` are then split over the arms."""
    body = {"name": name, "arms": [parse_arm(a) for a in arm], "judge": judge}
    body["keep_text"] = keep_text
    with fail_on_api_error(), client() as api:
        experiment = api.create_experiment(body)
    if as_json:
        print_json(experiment)
        return
    arms = ", ".join(f"{a['model']} ({a['weight']:g})" for a in experiment["arms"])
    console.print(f"experiment {name} running over {arms}", highlight=False)
    stdout.print(experiment["model"], highlight=False)


@app.command(name="list")
def list_experiments(
    status: Annotated[str | None, typer.Option(help="running or stopped")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Experiments, newest first."""
    with fail_on_api_error(), client() as api:
        page = api.list_experiments(status=status)
    if as_json:
        print_json(page)
        return
    table = Table("name", "status", "arms", "judge", "serves", "created")
    for exp in page["data"]:
        arms = ", ".join(f"{a['model']}={a['weight']:g}" for a in exp["arms"])
        table.add_row(
            exp["name"], exp["status"], arms, exp["judge"], exp["serves"] or "",
            exp["created_at"][:19].replace("T", " "),
        )  # fmt: skip
    stdout.print(table)


@app.command()
def show(name: NameArg) -> None:
    """One experiment as JSON."""
    with fail_on_api_error(), client() as api:
        print_json(api.get_experiment(name))


def _pct(rate: dict[str, Any]) -> str:
    if rate["estimate"] is None:
        return "-"
    return f"{rate['estimate']:.1%} [{rate['low']:.1%}, {rate['high']:.1%}]"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


@app.command()
def results(name: NameArg, as_json: JsonOpt = False) -> None:
    """Per arm: requests, unsafe and refusal rates with 95% intervals, output length, latency,
    feedback; then each arm minus the first."""
    with fail_on_api_error(), client() as api:
        report = api.experiment_results(name)
    if as_json:
        print_json(report)
        return
    table = Table(
        "arm", "requests", "judged", "unsafe", "refusals", "mean tokens", "p50 ms", "p95 ms",
        "feedback", title=f"{name} ({report['status']})",
    )  # fmt: skip
    for arm in report["arms"]:
        feedback = arm["feedback"]
        table.add_row(
            arm["model"], str(arm["requests"]), str(arm["judged"]),
            _pct(arm["unsafe_rate"]), _pct(arm["refusal_rate"]),
            "-" if arm["mean_output_tokens"] is None else f"{arm['mean_output_tokens']:.1f}",
            _ms(arm["latency_ms"]["p50"]), _ms(arm["latency_ms"]["p95"]),
            "-" if feedback["mean"] is None else f"{feedback['mean']:.2f} ({feedback['count']})",
        )  # fmt: skip
    stdout.print(table)
    for diff in report["differences"]:
        stdout.print(
            f"{diff['model']} - {diff['versus']}: unsafe {_points(diff['unsafe_rate'])}, "
            f"refusals {_points(diff['refusal_rate'])}",
            highlight=False,
        )
    method = report["method"]
    console.print(
        f"{report['confidence']:.0%} intervals: {method['rate']} (rates), "
        f"{method['difference']} (differences)",
        highlight=False,
    )


def _points(diff: dict[str, Any]) -> str:
    if diff["estimate"] is None:
        return "-"
    return f"{diff['estimate']:+.1%} [{diff['low']:+.1%}, {diff['high']:+.1%}]"


@app.command()
def stop(
    name: NameArg,
    winner: Annotated[
        str | None, typer.Option(help="the arm that then serves all traffic (default: base)")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Stop counting; route everything to the winner, or to base."""
    with fail_on_api_error(), client() as api:
        experiment = api.stop_experiment(name, winner=winner)
    if as_json:
        print_json(experiment)
    else:
        stdout.print(f"stopped {name}; exp:{name} now serves {experiment['serves']}")


@app.command()
def feedback(
    name: NameArg,
    response_id: Annotated[str, typer.Argument(help="the response's `id`")],
    score: Annotated[float, typer.Argument(help="a score on any scale (1/0, 1-5 ...)")],
) -> None:
    """Score one response of the experiment."""
    with fail_on_api_error(), client() as api:
        recorded = api.experiment_feedback(name, response_id, score)
    stdout.print(f"recorded {recorded['feedback']:g} for {response_id} ({recorded['arm']})")
