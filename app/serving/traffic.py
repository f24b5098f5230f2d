"""How something above serving steers and watches the OpenAI handlers' traffic (experiments do),
without serving knowing what it is.

A `TrafficRouter` turns a request's `model` and `user` into the model that serves it (a `Route`),
and hears about every finished response of a route it asked to watch. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class Route:
    """Where a routed request goes."""

    model: str  # the model that serves it: "base" or a version
    watched: bool  # hand its finished response to `TrafficRouter.served`
    ticket: Any = None  # the router's own, given back with the response


@dataclass(frozen=True)
class ServedResponse:
    """A finished response, as a router hears of it (a stream that ends early is never one)."""

    response_id: str
    prompt: str
    text: str
    latency_ms: float
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None


class TrafficRouter(Protocol):
    def route(self, model: str, user: str | None) -> Route | None:
        """The route of a request for `model`, or None when `model` is not one this router
        routes (it is then served as named). Blocking; raises UnknownModelError."""
        ...

    def served(self, route: Route, response: ServedResponse) -> None:
        """A watched route's response has finished. Must not block the caller."""
        ...
