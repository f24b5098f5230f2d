"""Experiments as the serving handlers' `TrafficRouter`: `exp:<name>` is routed to an arm, and
every response it served while running is handed to the outcome recorder."""

from __future__ import annotations

from app.experiments.outcomes import OutcomeRecorder
from app.experiments.routing import ExperimentRouter
from app.serving.traffic import Route, ServedResponse


class ExperimentTraffic:
    def __init__(self, router: ExperimentRouter, recorder: OutcomeRecorder):
        self._router = router
        self._recorder = recorder

    def route(self, model: str, user: str | None) -> Route | None:
        assignment = self._router.route(model, user)
        if assignment is None:
            return None
        return Route(assignment.model, watched=assignment.recorded, ticket=assignment)

    def served(self, route: Route, response: ServedResponse) -> None:
        self._recorder.submit(route.ticket, response)
