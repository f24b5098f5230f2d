"""`detox chat` and `detox ab`: clients of the API's generation endpoints (DETOX_URL)."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer
from rich.table import Table

from app.cli.client import DetoxClient
from app.cli.output import fail_on_api_error, print_json, stdout
from app.settings import get_settings

JsonOpt = Annotated[bool, typer.Option("--json", help="print only the JSON answer on stdout")]
TokensOpt = Annotated[int | None, typer.Option("--max-tokens", help="new tokens at most")]
Prompt = Annotated[str, typer.Argument(help="the user's message")]
ModelOpt = Annotated[
    str, typer.Option("--model", help='"base", a version, "latest" or "exp:<experiment>"')
]


def chat(
    prompt: Prompt,
    model: ModelOpt = "latest",
    system: Annotated[str | None, typer.Option(help="a system message first")] = None,
    max_tokens: TokensOpt = None,
    temperature: Annotated[float, typer.Option(help="0: greedy")] = 0.0,
    stream: Annotated[bool, typer.Option(help="print the answer as it is generated")] = True,
    user: Annotated[
        str | None, typer.Option(help="who asks (OpenAI's `user`): in an experiment, one arm")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Ask one model (base, a version, or an experiment's arm) on a detox server."""
    messages = [{"role": "system", "content": system}] if system else []
    body: dict[str, Any] = {
        "model": model,
        "messages": [*messages, {"role": "user", "content": prompt}],
        "temperature": temperature,
    }
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    if user is not None:
        body["user"] = user
    with fail_on_api_error(), DetoxClient.from_settings(get_settings()) as api:
        if as_json or not stream:
            answer = api.chat(body)
            if as_json:
                print_json(answer)
            else:
                sys.stdout.write(answer["choices"][0]["message"]["content"] + "\n")
            return
        for piece in api.chat_stream(body):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")


def ab(
    prompt: Prompt,
    arms: Annotated[str, typer.Option("--arms", help="comma-separated models, e.g. base,v3")],
    max_tokens: TokensOpt = None,
    temperature: Annotated[float, typer.Option(help="0: greedy")] = 0.0,
    judge: Annotated[bool, typer.Option(help="score each answer with the server's judge")] = True,
    as_json: JsonOpt = False,
) -> None:
    """The same prompt through several models at once, each answer judged."""
    names = [a.strip() for a in arms.split(",") if a.strip()]
    body: dict[str, Any] = {
        "messages": [{"role": "user", "content": prompt}],
        "arms": names,
        "temperature": temperature,
        "judge": judge,
    }
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    with fail_on_api_error(), DetoxClient.from_settings(get_settings()) as api:
        result = api.ab(body)
    if as_json:
        print_json(result)
        return
    table = Table(title=f"judge: {result.get('judge') or 'off'}")
    for column in ("model", "unsafe", "ms", "tokens", "text"):
        table.add_column(column, overflow="fold")
    for arm in result["arms"]:
        score = arm["unsafe_score"]
        table.add_row(
            arm["model"],
            "-" if score is None else f"{score:.2f}",
            f"{arm['latency_ms']:.0f}",
            str(arm["usage"]["completion_tokens"]),
            arm["text"],
        )
    stdout.print(table)


def register(app: typer.Typer) -> None:
    app.command()(chat)
    app.command()(ab)
