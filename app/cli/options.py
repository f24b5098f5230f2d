"""Options that several commands share."""

from __future__ import annotations

from typing import Annotated

import typer

CaseOpt = Annotated[
    list[str] | None,
    typer.Option("--case", help="id of an instance to edit on (repeat it for several)"),
]
AllCasesOpt = Annotated[bool, typer.Option("--all", help="edit on every instance of FILE")]
