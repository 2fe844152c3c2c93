"""`peftreg serve --workers N`: N uvicorn worker processes, one set of background threads.

uvicorn starts each worker process by importing `worker_app` (a factory),
which builds the app from the environment. The supervising process (the
one `peftreg serve` runs in) migrates the database once, before any worker
starts, and runs the embedded job worker and periodic garbage collection
itself: they stay single however many workers serve HTTP. The workers are
told so through the environment (`PEFTREG_EMBEDDED_WORKER=false`,
`PEFTREG_GC_INTERVAL_SECONDS=0`, `PEFTREG_AUTO_MIGRATE=false`).

All of them, the supervisor included, keep their metrics in one directory
(`shared_metrics`), so `/metrics` answers the same sums whichever worker a
scrape reaches (`peftreg.registry.observability.metrics`).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from fastapi import FastAPI

from peftreg.registry.settings import Settings

LOG_LEVEL_ENV = "PEFTREG_SERVE_LOG_LEVEL"
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's multiprocess mode


@contextmanager
def shared_metrics() -> Iterator[Path]:
    """A directory for the metrics of every process of this server, named in the
    environment (which the workers inherit) for the duration.

    prometheus_client picks its mode when it is imported, so this must come
    first. A directory the environment already names (a writable volume where
    the root filesystem is read-only) is used and emptied of an earlier run's
    values; otherwise a new temporary one, removed at the end.
    """
    if "prometheus_client" in sys.modules:
        raise RuntimeError("shared_metrics() must run before prometheus_client is imported")
    given = os.environ.get(METRICS_DIR_ENV)
    if given:
        directory = Path(given)
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob("*.db"):
            stale.unlink()
    else:
        directory = Path(tempfile.mkdtemp(prefix="peftreg-metrics-"))
        os.environ[METRICS_DIR_ENV] = str(directory)
    try:
        yield directory
    finally:
        if not given:
            shutil.rmtree(directory, ignore_errors=True)
            os.environ.pop(METRICS_DIR_ENV, None)


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
