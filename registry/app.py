"""`create_app(settings)`: the one place the service is assembled."""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

from fastapi import FastAPI
from sqlalchemy.orm import configure_mappers

from peftreg.registry.api.errors import install_error_handlers
from peftreg.registry.api.middleware import RequestIdMiddleware
from peftreg.registry.api.openapi import openapi_document
from peftreg.registry.api.routes import (
    health,
    jobs,
    management,
    metrics,
    oci_base,
    oci_blobs,
    oci_manifests,
    oci_uploads,
    schemas,
    token,
    watch,
)
from peftreg.registry.background import BackgroundThreads
from peftreg.registry.db.engine import make_engine, make_session_factory
from peftreg.registry.observability.http_metrics import HttpMetricsMiddleware
from peftreg.registry.observability.metrics import Metrics
from peftreg.registry.observability.store_metrics import InstrumentedBlobStore
from peftreg.registry.settings import Settings
from peftreg.registry.state import Services
from peftreg.registry.storage.factory import open_blob_store
from peftreg.registry.web.app import install_web_ui

logger = logging.getLogger(__name__)


def build_services(settings: Settings) -> Services:
    settings.home.mkdir(parents=True, exist_ok=True)
    url = settings.resolved_database_url()
    if settings.should_auto_migrate():
        from peftreg.registry.db.migrate import upgrade

        upgrade(url)
    engine = make_engine(url, echo=settings.database_echo)
    instruments = Metrics()
    return Services(
        settings=settings,
        engine=engine,
        sessions=make_session_factory(engine),
        store=InstrumentedBlobStore(open_blob_store(settings), instruments, settings.storage),
        metrics=instruments,
    )


def background_threads(settings: Settings, services: Services) -> BackgroundThreads:
    """What runs beside the API in this process: the embedded worker, periodic jobs."""
    threads = BackgroundThreads()
    if settings.should_run_embedded_worker():
        if importlib.util.find_spec("torch") is None:
            # A job claimed here could only fail: leave the queue to workers that compute.
            logger.warning(
                "embedded worker off: torch is not installed (install torch and "
                "'peftreg[worker]' to run merge and INT4 jobs in this process)"
            )
        else:
            from peftreg.registry.jobs.worker import embedded_worker

            threads.add("embedded-worker", lambda stop: embedded_worker(services).run(stop))
    if settings.gc_interval_seconds > 0:
        from peftreg.registry.maintenance.gc import run_periodic_gc

        threads.add("periodic-gc", partial(run_periodic_gc, services))
    return threads


def create_app(settings: Settings, services: Services | None = None) -> FastAPI:
    services = services or build_services(settings)
    threads = background_threads(settings, services)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        from peftreg.registry.jobs.observe import observe_jobs

        # The ORM sets up its mapped classes on first use: at start-up, not in a request
        # (about 20 ms of the first one's time).
        configure_mappers()
        observe_jobs(services)
        threads.start()
        try:
            yield
        finally:
            threads.shutdown()

    app = FastAPI(
        title="peftreg",
        version="0.1.0",
        description="Adapter registry: OCI Distribution API and JSON management API.",
        lifespan=lifespan,
    )
    app.state.services = services
    app.openapi = partial(openapi_document, app, settings)  # type: ignore[method-assign]
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(oci_base.router)
    app.include_router(token.router)
    app.include_router(schemas.router)
    app.include_router(oci_uploads.router)
    app.include_router(oci_blobs.router)
    app.include_router(oci_manifests.router)
    app.include_router(management.router)
    app.include_router(watch.router)
    app.include_router(jobs.router)
    app.include_router(metrics.router)
    install_web_ui(app, settings)
    app.add_middleware(HttpMetricsMiddleware)
    app.add_middleware(RequestIdMiddleware)
    return app
