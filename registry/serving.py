"""`peftreg serve --workers N`: N uvicorn worker processes, one set of background threads.

uvicorn starts each worker process by importing `worker_app` (a factory),
which builds the app from the environment. The supervising process (the
one `peftreg serve` runs in) migrates the database once, before any worker
starts, and runs the embedded job worker and periodic garbage collection
itself: they stay single however many workers serve HTTP. The workers are
told so through the environment (`PEFTREG_EMBEDDED_WORKER=false`,
`PEFTREG_GC_INTERVAL_SECONDS=0`, `PEFTREG_AUTO_MIGRATE=false`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from fastapi import FastAPI

from peftreg.registry.settings import Settings

LOG_LEVEL_ENV = "PEFTREG_SERVE_LOG_LEVEL"


def worker_environment(settings: Settings, log_level: str) -> dict[str, str]:
    """What a worker process needs on top of the supervisor's environment."""
    return {
        "PEFTREG_HOST": settings.host,
        "PEFTREG_PORT": str(settings.port),
        "PEFTREG_EMBEDDED_WORKER": "false",
        "PEFTREG_GC_INTERVAL_SECONDS": "0",
        "PEFTREG_AUTO_MIGRATE": "false",
        LOG_LEVEL_ENV: log_level,
    }


def worker_app(environ: Mapping[str, str] | None = None) -> FastAPI:
    """The app of one worker process (called by uvicorn in that process)."""
    from peftreg.registry.app import create_app
    from peftreg.registry.observability.logging import configure_logging

    environ = os.environ if environ is None else environ
    settings = Settings()
    configure_logging(settings.log_format, environ.get(LOG_LEVEL_ENV, "info"))
    return create_app(settings)
