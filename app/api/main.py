"""The HTTP application: `create_app(settings)` wires settings, database, broker and routers.

Migrations are not run here: `detox api` and `detox up` upgrade the database before serving.
Run with `uvicorn --factory app.api.main:create_app`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI

from app.api.auth import KeyCache, annotate_roles
from app.api.body_limit import BodyLimit, is_corpus_upload
from app.api.broker import Broker, CeleryBroker, broker_error
from app.api.errors import install_error_handlers
from app.api.observability import RequestObserver, ServiceCollector, new_registry
from app.api.ratelimit import make_limiter
from app.api.routes import (
    corpora,
    experiments,
    generation,
    health,
    jobs,
    keys,
    metrics,
    ui,
    versions,
)
from app.experiments.outcomes import OutcomeRecorder, verdicts_via
from app.experiments.routing import ExperimentRouter
from app.experiments.traffic import ExperimentTraffic
from app.notify import is_redis
from app.serving.provider import ServingProvider
from app.settings import Settings, get_settings
from app.store.db import make_engine, make_sessionmaker

if TYPE_CHECKING:
    from app.serving.engine_base import EngineBase as Engine

EngineFactory = Callable[[Any], "Engine"]


def create_app(
    settings: Settings | None = None,
    *,
    broker: Broker | None = None,
    engine_factory: EngineFactory | None = None,
) -> FastAPI:
    """The API for `settings` (default: from the environment); `broker` defaults to the workers'
    Celery app. The generation engine is built on first use by `engine_factory(sessionmaker)`
    (default: the configured model, versions from the store)."""
    settings = settings or get_settings()

    def default_engine(sessions: Any) -> Engine:
        from app.serving.factory import build_engine  # torch: only once generation is used

        return build_engine(settings, sessions)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = make_engine(settings.resolved_database_url())
        app.state.engine = engine
        sessions = make_sessionmaker(engine)
        app.state.sessionmaker = sessions
        app.state.experiments = ExperimentRouter(sessions, ttl_s=settings.experiment_cache_s)
        app.state.outcomes = OutcomeRecorder(
            sessions, verdicts_via(lambda: app.state.serving.get_sync().engine)
        )
        app.state.serving = ServingProvider(
            lambda: (engine_factory or default_engine)(sessions),
            traffic=ExperimentTraffic(app.state.experiments, app.state.outcomes),
        )
        if settings.serving_preload:  # the first request then finds the model loaded
            await asyncio.to_thread(app.state.serving.get_sync)
        try:
            yield
        finally:
            app.state.outcomes.close()  # what was served is recorded before the engine goes
            app.state.serving.close()
            engine.dispose()

    app = FastAPI(
        title="detox",
        summary="Detoxify LLMs by editing their weights; versioned weight deltas.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.broker = broker or CeleryBroker(settings)
    app.state.key_cache = KeyCache(settings.auth_cache_s)
    broker_url = settings.resolved_broker_url()
    app.state.rate_limiter = make_limiter(
        settings.rate_limit_per_minute,
        settings.rate_limit_burst,
        broker_url if is_redis(broker_url) else None,
    )
    install_error_handlers(app, broker_error=broker_error())
    app.add_middleware(BodyLimit, max_bytes=settings.max_request_bytes, exempt=is_corpus_upload)
    app.state.registry, latency = new_registry()
    app.add_middleware(RequestObserver, latency=latency)  # outermost: sees every answer
    app.state.registry.register(
        ServiceCollector(
            lambda: app.state.sessionmaker,
            lambda: app.state.serving,
            lambda: app.state.outcomes,
        )
    )
    routers = [
        m.router for m in (health, jobs, versions, corpora, experiments, generation, keys, metrics)
    ]
    annotate_roles(routers)
    for router in routers:
        app.include_router(router)
    app.include_router(ui.router)  # the web playground (/ui): loads without an API key
    return app
