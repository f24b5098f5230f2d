"""The HTTP application: `create_app(settings)` wires settings, database, broker and routers.

Migrations are not run here: `detox api` and `detox up` upgrade the database before serving.
Run with `uvicorn --factory app.api.main:create_app`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app.api.broker import Broker, CeleryBroker, broker_error
from app.api.errors import install_error_handlers
from app.api.routes import health, jobs, versions
from app.settings import Settings, get_settings
from app.store.db import make_engine, make_sessionmaker


def create_app(settings: Settings | None = None, *, broker: Broker | None = None) -> FastAPI:
    """The API for `settings` (default: from the environment); `broker` defaults to the workers'
    Celery app."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = make_engine(settings.resolved_database_url())
        app.state.engine = engine
        app.state.sessionmaker = make_sessionmaker(engine)
        try:
            yield
        finally:
            engine.dispose()

    app = FastAPI(
        title="detox",
        summary="Detoxify LLMs by editing their weights; versioned weight deltas.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.broker = broker or CeleryBroker(settings)
    install_error_handlers(app, broker_error=broker_error())
    for router in (health.router, jobs.router, versions.router):
        app.include_router(router)
    return app
