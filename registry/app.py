"""`create_app(settings)`: the one place the service is assembled."""

from __future__ import annotations

from fastapi import FastAPI

from registry.api.errors import install_error_handlers
from registry.api.middleware import RequestIdMiddleware
from registry.api.routes import health, management, oci_base, oci_blobs, oci_manifests, oci_uploads
from registry.db.engine import make_engine, make_session_factory
from registry.settings import Settings
from registry.state import Services
from registry.storage.factory import open_blob_store


def build_services(settings: Settings) -> Services:
    settings.home.mkdir(parents=True, exist_ok=True)
    url = settings.resolved_database_url()
    if settings.should_auto_migrate():
        from registry.db.migrate import upgrade

        upgrade(url)
    engine = make_engine(url, echo=settings.database_echo)
    return Services(
        settings=settings,
        engine=engine,
        sessions=make_session_factory(engine),
        store=open_blob_store(settings),
    )


def create_app(settings: Settings, services: Services | None = None) -> FastAPI:
    services = services or build_services(settings)
    app = FastAPI(
        title="peftreg",
        version="0.1.0",
        description="Adapter registry: OCI Distribution API and JSON management API.",
    )
    app.state.services = services
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(oci_base.router)
    app.include_router(oci_uploads.router)
    app.include_router(oci_blobs.router)
    app.include_router(oci_manifests.router)
    app.include_router(management.router)
    app.add_middleware(RequestIdMiddleware)
    return app
