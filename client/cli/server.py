"""Server-side commands: `peftreg serve` and `peftreg db ...`.

The registry package is imported inside each command, so the client half
of the CLI works where only the library is installed.
"""

from __future__ import annotations

import json
import os

import click


@click.command()
@click.option("--host", default=None, help="Address to bind (default PEFTREG_HOST or 127.0.0.1).")
@click.option("--port", type=int, default=None, help="Port (default PEFTREG_PORT or 8750).")
@click.option("--log-level", default="info", show_default=True)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="HTTP worker processes. With more than one, this process supervises them and "
    "runs the embedded job worker and periodic GC itself, once.",
)
@click.option(
    "--json", "as_json", is_flag=True, help="Log JSON lines (as PEFTREG_LOG_FORMAT=json)."
)
def serve(host: str | None, port: int | None, log_level: str, workers: int, as_json: bool) -> None:
    """Run the registry (uvicorn). Defaults: SQLite and files under PEFTREG_HOME.

    Nothing goes to stdout: logs and the start-up line go to stderr.
    """
    from peftreg.registry.serving import METRICS_DIR_ENV, shared_metrics

    if workers == 1 and METRICS_DIR_ENV not in os.environ:
        _serve(host, port, log_level, workers, as_json)
        return
    with shared_metrics():  # before anything imports prometheus_client
        _serve(host, port, log_level, workers, as_json)


def _serve(host: str | None, port: int | None, log_level: str, workers: int, as_json: bool) -> None:
    import uvicorn

    from peftreg.registry.app import background_threads, build_services, create_app
    from peftreg.registry.observability.logging import configure_logging
    from peftreg.registry.settings import Settings
    from peftreg.registry.zero_copy import SendfileHttpToolsProtocol

    overrides: dict[str, object] = {}
    if host is not None:
        overrides["host"] = host
    if port is not None:
        overrides["port"] = port
    if as_json:
        overrides["log_format"] = "json"
    settings = Settings(**overrides)  # type: ignore[arg-type]
    configure_logging(settings.log_format, log_level)
    if settings.anonymous_scope() == "none" and settings.admin_token is None:
        click.echo(
            "peftreg: anonymous access is off and no PEFTREG_ADMIN_TOKEN is set; "
            "only existing API tokens can use this registry",
            err=True,
        )

    def run(app: object, workers: int = 1) -> None:
        uvicorn.run(
            app,  # type: ignore[arg-type]  # an ASGI app, or an import string with workers
            host=settings.host,
            port=settings.port,
            log_level=log_level,
            log_config=None,  # uvicorn's records go to the handler configure_logging installed
            access_log=False,
            timeout_graceful_shutdown=10,
            factory=workers > 1,
            workers=workers,
            http=SendfileHttpToolsProtocol,  # blob GETs sent from the file by the kernel
        )

    address = f"http://{settings.host}:{settings.port}"
    summary = (
        f"(database {settings.resolved_database_url().split('://')[0]}, "
        f"storage {settings.storage}, anonymous access: {settings.anonymous_scope()}"
    )
    if workers == 1:
        app = create_app(settings)
        click.echo(f"peftreg serving on {address} {summary})", err=True)
        run(app)
        return
    from peftreg.registry.serving import worker_environment

    services = build_services(settings)  # migrates once, before any worker starts
    threads = background_threads(settings, services)
    os.environ.update(worker_environment(settings, log_level))
    click.echo(
        f"peftreg serving on {address} {summary}, {workers} workers)",
        err=True,
    )
    threads.start()
    try:
        run("peftreg.registry.serving:worker_app", workers)
    finally:
        threads.shutdown()
        services.engine.dispose()


@click.group()
def db() -> None:
    """Database schema migrations."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def db_upgrade(revision: str, as_json: bool) -> None:
    """Migrate the database named by PEFTREG_DATABASE_URL (or the embedded one)."""
    from peftreg.registry.db.migrate import upgrade
    from peftreg.registry.settings import Settings

    settings = Settings()
    settings.home.mkdir(parents=True, exist_ok=True)
    upgrade(settings.resolved_database_url(), revision)
    _report_revision(revision, as_json)


@db.command("downgrade")
@click.argument("revision")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def db_downgrade(revision: str, as_json: bool) -> None:
    """Migrate the database down to REVISION (`base` removes every table)."""
    from peftreg.registry.db.migrate import downgrade
    from peftreg.registry.settings import Settings

    downgrade(Settings().resolved_database_url(), revision)
    _report_revision(revision, as_json)


def _report_revision(revision: str, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps({"revision": revision}))
    else:
        click.echo(f"database at {revision}")
