"""`peftreg worker`: a job worker process (server side: needs the database and the store)."""

from __future__ import annotations

import signal
import threading
from types import FrameType

import click


@click.command()
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default=None,
    help="Where tensors are computed (default PEFTREG_WORKER_DEVICE or auto: CUDA when present).",
)
@click.option("--concurrency", type=int, default=1, show_default=True, help="Jobs at a time.")
@click.option(
    "--shutdown-grace",
    type=float,
    default=30.0,
    show_default=True,
    help="On SIGTERM, seconds a running job may take to finish before it is released.",
)
@click.option(
    "--metrics-port",
    type=int,
    default=None,
    help="Serve this worker's Prometheus metrics (job durations, heartbeats) on PORT.",
)
@click.option("--log-level", default="info", show_default=True)
@click.option(
    "--json", "as_json", is_flag=True, help="Log JSON lines (as PEFTREG_LOG_FORMAT=json)."
)
def worker(
    device: str | None,
    concurrency: int,
    shutdown_grace: float,
    metrics_port: int | None,
    log_level: str,
    as_json: bool,
) -> None:
    """Claim and run jobs (merges, INT4 exports) until SIGTERM.

    On SIGTERM or Ctrl-C the worker stops claiming, lets a running job finish
    within --shutdown-grace, and otherwise releases it to the queue; a second
    signal exits at once (the job's lease then expires and another worker
    takes it).
    """
    from peftreg.registry.app import build_services
    from peftreg.registry.jobs.handlers import default_handlers
    from peftreg.registry.jobs.worker import JobWorker
    from peftreg.registry.observability.logging import configure_logging
    from peftreg.registry.settings import Settings

    settings = Settings(log_format="json") if as_json else Settings()
    configure_logging(settings.log_format, log_level)
    services = build_services(settings)
    job_worker = JobWorker(
        services,
        default_handlers(),
        concurrency=concurrency,
        device=device or settings.worker_device,
        shutdown_grace=shutdown_grace,
        observe=services.metrics.observe_job,
    )
    if metrics_port is not None:
        from prometheus_client import start_http_server

        from peftreg.registry.jobs.observe import observe_jobs

        observe_jobs(services)
        start_http_server(metrics_port, registry=services.metrics.registry)
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        if stop.is_set():
            raise SystemExit(128 + signum)
        click.echo(f"peftreg worker: signal {signum}, stopping", err=True)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    click.echo(
        f"peftreg worker {job_worker.worker_id} on {job_worker.device} "
        f"(concurrency {job_worker.concurrency})",
        err=True,
    )
    job_worker.run(stop)
