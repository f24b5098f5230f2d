"""HTTP: routing, request/response schemas, error mapping. No torch is imported here.

`create_app` is imported on first use, not with the package: the CLI's clients import the
schemas (`app.api.schemas`) and start ~0.7 s faster without the whole app behind them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from app.api.main import create_app

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from app.api.main import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
