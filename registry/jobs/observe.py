"""Job metrics read from the database: queue depth and worker heartbeats."""

from __future__ import annotations

from peftreg.registry.jobs import queue
from peftreg.registry.state import Services


def observe_jobs(services: Services) -> None:
    """Point the app's job gauges at the queue (read at scrape time, without the write lock)."""

    def depth() -> dict[tuple[str, str], int]:
        with services.read_transaction() as session:
            return queue.queue_depth(session)

    def heartbeats() -> dict[str, float]:
        with services.read_transaction() as session:
            return queue.worker_heartbeats(session)

    services.metrics.set_queue_source(depth)
    services.metrics.set_worker_source(heartbeats)
