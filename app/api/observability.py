"""What the API process tells operators: Prometheus metrics and one access log line a request.

`RequestObserver` (ASGI middleware) gives each request an id (the client's `X-Request-ID` when it
sends a sane one, else a new one), echoes it in the response, times the request into
`detox_http_request_duration_seconds{method, route, status}` (the route template, never the raw
path, so the label set stays small) and logs one access line, all with the id in the log context.
An exception no handler took is answered here (500 in the envelope) and logged here, once, with
its traceback and the request id; it goes no further (uvicorn would log it a second time, outside
the request's context).

`ServiceCollector` computes the rest at scrape time: jobs by kind and status and the queue depth
from the store, a job-duration histogram over every finished job in the store (cumulative, as
Prometheus expects: jobs are never deleted), and from the serving engine, once it is loaded (a
scrape never loads the model), tokens generated per model and the version cache's hits, misses
and size.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from sqlalchemy.orm import Session, sessionmaker
from starlette.datastructures import MutableHeaders
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import logs
from app.api import errors
from app.experiments.outcomes import OutcomeRecorder
from app.serving.provider import ServingProvider
from app.store import crud
from app.store.models import JOB_KINDS, JOB_STATUSES

log = logging.getLogger("detox.access")

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
JOB_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200)


def new_registry() -> tuple[CollectorRegistry, Histogram]:
    """A registry of one app (several apps in one process keep their own), and its latency
    histogram."""
    registry = CollectorRegistry(auto_describe=True)
    latency = Histogram(
        "detox_http_request_duration_seconds",
        "HTTP request latency, by method, route template and status",
        ("method", "route", "status"),
        buckets=LATENCY_BUCKETS,
        registry=registry,
    )
    return registry, latency


class RequestObserver:
    def __init__(self, app: ASGIApp, *, latency: Histogram):
        self.app = app
        self.latency = latency

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = _request_id(scope)
        token = logs.request_id.set(rid)
        start = time.perf_counter()
        status = 500  # what the client gets if the app raises before answering
        started = finished = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started, finished
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                MutableHeaders(scope=message)["X-Request-ID"] = rid
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                finished = True
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            errors.log.error(
                "unhandled error on %s %s", scope["method"], scope["path"], exc_info=exc
            )
            if not started:
                body = errors.error_body("internal server error", errors.INTERNAL,
                                         code="internal_error")  # fmt: skip
                await JSONResponse(body, status_code=500)(scope, receive, send_with_id)
            elif not finished:  # a stream that broke: end it (its client sees it cut short)
                await send_with_id({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            seconds = time.perf_counter() - start
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.latency.labels(scope["method"], route, str(status)).observe(seconds)
            log.info(
                "%s %s %d %.1f ms", scope["method"], scope["path"], status, seconds * 1000,
                extra={"method": scope["method"], "route": route, "status": status,
                       "duration_ms": round(seconds * 1000, 2)},
            )  # fmt: skip
            logs.request_id.reset(token)


def _request_id(scope: Scope) -> str:
    for name, value in scope.get("headers", []):
        if name == b"x-request-id":
            candidate = value.decode("latin-1")
            if _REQUEST_ID.fullmatch(candidate):
                return candidate
    return uuid.uuid4().hex


class ServiceCollector:
    """Store and engine metrics, read at each scrape."""

    def __init__(
        self,
        sessions: Callable[[], sessionmaker[Session]],
        serving: Callable[[], ServingProvider],
        outcomes: Callable[[], OutcomeRecorder] | None = None,
    ):
        self._sessions = sessions  # callables: the app makes them when it starts
        self._serving = serving
        self._outcomes = outcomes

    def describe(self) -> list[Metric]:
        return []  # computed at collect time only: nothing to describe up front

    def collect(self) -> Iterator[Metric]:
        yield from self._store_metrics()
        yield from self._engine_metrics()
        yield from self._experiment_metrics()

    def _store_metrics(self) -> Iterator[Metric]:
        with self._sessions()() as session:
            by = crud.job_counts(session=session)
            finished = crud.finished_job_times(session=session)
        jobs = GaugeMetricFamily("detox_jobs", "Jobs by kind and status", labels=("kind", "status"))
        for kind in JOB_KINDS:
            for status in JOB_STATUSES:
                jobs.add_metric([kind, status], by.get((kind, status), 0))
        yield jobs
        queued = sum(n for (_, status), n in by.items() if status == "queued")
        yield GaugeMetricFamily("detox_queue_depth", "Jobs queued, not yet running", value=queued)
        yield _job_durations(finished)

    def _engine_metrics(self) -> Iterator[Metric]:
        engine = self._serving().engine_if_loaded()
        tokens = CounterMetricFamily(
            "detox_generated_tokens", "Tokens generated, by served model", labels=("model",)
        )
        hits = CounterMetricFamily("detox_version_cache_hits", "Version cache hits")
        misses = CounterMetricFamily("detox_version_cache_misses", "Version cache misses (loads)")
        size = GaugeMetricFamily("detox_version_cache_size", "Versions held in the cache")
        if engine is not None:
            for model, count in sorted(engine.generated_tokens.items()):
                tokens.add_metric([model], count)
        cache = getattr(engine, "cache", None)  # the built-in engine's; vLLM holds its own
        if cache is not None:
            hits.add_metric([], cache.hits)
            misses.add_metric([], cache.loads)
            size.add_metric([], len(cache))
        yield from (tokens, hits, misses, size)

    def _experiment_metrics(self) -> Iterator[Metric]:
        recorder = self._outcomes() if self._outcomes is not None else None
        recorded = CounterMetricFamily(
            "detox_experiment_outcomes_recorded", "Experiment responses recorded in the store"
        )
        dropped = CounterMetricFamily(
            "detox_experiment_outcomes_dropped",
            "Experiment responses not recorded (queue full, or the database stayed down)",
        )
        if recorder is not None:
            recorded.add_metric([], recorder.recorded)
            dropped.add_metric([], recorder.dropped)
        yield from (recorded, dropped)


def _job_durations(rows: list[tuple[str, datetime, datetime]]) -> Metric:
    family = HistogramMetricFamily(
        "detox_job_duration_seconds", "Run time of finished jobs (start to finish), by kind",
        labels=("kind",),
    )  # fmt: skip
    for kind in JOB_KINDS:
        seconds = [
            (finished - started).total_seconds() for k, started, finished in rows if k == kind
        ]
        buckets = [(str(b), sum(1 for s in seconds if s <= b)) for b in JOB_BUCKETS]
        buckets.append(("+Inf", len(seconds)))
        family.add_metric([kind], buckets, sum_value=sum(seconds))
    return family
