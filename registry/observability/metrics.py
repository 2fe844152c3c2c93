"""`Metrics`: the Prometheus metrics of one app, in a registry of its own.

No global registry: several apps (tests, a worker beside an API) may live
in one process, and each exposes only its own numbers at `/metrics`.

- `http_requests_total{method, route, status}`: requests served. `route` is
  the route template (`/v2/{name}/blobs/{digest}`), never the raw path, so
  the number of series stays bounded.
- `http_request_duration_seconds{method, route}`: histogram of serving time.
- `blob_bytes_total{direction}`: blob bytes received by uploads (`in`) and
  sent by blob GETs (`out`).
- `blob_bytes_zero_copy_total{direction}`: the part of `blob_bytes_total`
  moved by the kernel (`peftreg.registry.zero_copy`): request bodies spliced
  from the socket into the upload's file (`in`), blobs sent from the file
  (`out`).
- `blob_store_seconds{backend, operation}`: histogram of blob store calls.
- `job_duration_seconds{kind, outcome}`: histogram of finished job attempts
  (`observe_job`).
- `jobs_queue_depth{kind, status}`: jobs per kind and status, read at scrape
  time from the callable given to `set_queue_source`.
- `worker_last_heartbeat_timestamp_seconds{worker}`: each worker's last
  heartbeat as unix time, from the callable given to `set_worker_source`.
- `gc_runs_total{outcome}`, `gc_reclaimed_bytes_total`: garbage collection
  runs of this process (`observe_gc`).
- `tag_watches_in_flight`: tag long-polls waiting for a change now
  (`add_tag_watches`).

Plus the `process_*` metrics of the serving process.

Under `peftreg serve --workers N` several processes serve one registry: the
workers answer requests, the supervisor runs the job worker and gc. Each
scrape reaches one worker, so each process's own numbers would make
counters jump between scrapes and hide the supervisor's. There,
prometheus_client runs in its multiprocess mode (`PROMETHEUS_MULTIPROC_DIR`,
set up by `peftreg.registry.serving.shared_metrics` before the library is
imported): every process writes its values to files in that directory, and
`/metrics` sums them across processes (`tag_watches_in_flight` across the
live ones). The `process_*` metrics are left out there: they would describe
whichever worker answered.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping
from typing import TypeVar

from prometheus_client import (
    CONTENT_TYPE_PLAIN_0_0_4,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
    multiprocess,
    values,
)
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

logger = logging.getLogger(__name__)
K = TypeVar("K")
V = TypeVar("V")

QueueSource = Callable[[], Mapping[tuple[str, str], int]]
"""Returns the number of jobs per (kind, status)."""
WorkerSource = Callable[[], Mapping[str, float]]
"""Returns each worker's last heartbeat as unix time, by worker id."""

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
STORE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
JOB_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400)


class _SourceCollector:
    """Gauges read from callables the app registers, at scrape time.

    A failing source is logged and leaves its gauge out of that scrape: a
    database hiccup must not turn `/metrics` into an error.
    """

    def __init__(self) -> None:
        self.queue: QueueSource | None = None
        self.workers: WorkerSource | None = None

    def describe(self) -> Iterable[Metric]:
        return [self._queue_family(), self._worker_family()]

    def collect(self) -> Iterable[Metric]:
        if self.queue is not None:
            family = self._queue_family()
            for (kind, status), count in sorted(_read("jobs_queue_depth", self.queue).items()):
                family.add_metric([kind, status], count)
            yield family
        if self.workers is not None:
            family = self._worker_family()
            for worker, seen in sorted(_read("worker heartbeats", self.workers).items()):
                family.add_metric([worker], seen)
            yield family

    @staticmethod
    def _queue_family() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "jobs_queue_depth", "Jobs by kind and status.", labels=["kind", "status"]
        )

    @staticmethod
    def _worker_family() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "worker_last_heartbeat_timestamp_seconds",
            "Unix time of each worker's last heartbeat.",
            labels=["worker"],
        )


def _read(what: str, source: Callable[[], Mapping[K, V]]) -> Mapping[K, V]:
    try:
        return source()
    except Exception:
        logger.warning("metrics source for %s failed", what, exc_info=True)
        return {}


def shared_directory() -> str | None:
    """The directory the processes of one server share their values in, when
    prometheus_client runs in multiprocess mode; None in a process of its own."""
    if values.ValueClass is values.MutexValue:
        return None
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR")


def _forget_dead_processes(directory: str) -> None:
    """Drop the live-gauge files of processes that are gone (a worker that crashed
    while it counted watches in flight must not count them forever)."""
    for name in os.listdir(directory):
        if not name.startswith("gauge_live") or not name.endswith(".db"):
            continue
        pid = name.rpartition("_")[2].removesuffix(".db")
        if pid.isdigit() and not _alive(int(pid)):
            multiprocess.mark_process_dead(int(pid), directory)  # type: ignore[no-untyped-call]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Metrics:
    def __init__(self) -> None:
        self.shared_directory = shared_directory()
        if self.shared_directory is not None:  # the values' files are made from here on
            os.makedirs(self.shared_directory, exist_ok=True)
        self.registry = CollectorRegistry()
        self.http_requests = Counter(
            "http_requests",
            "HTTP requests served, by route template and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.http_duration = Histogram(
            "http_request_duration_seconds",
            "Time to serve an HTTP request, by route template.",
            ["method", "route"],
            registry=self.registry,
        )
        self.blob_bytes = Counter(
            "blob_bytes",
            "Blob bytes received by uploads (in) and sent by blob GETs (out).",
            ["direction"],
            registry=self.registry,
        )
        self.blob_bytes_zero_copy = Counter(
            "blob_bytes_zero_copy",
            "Blob bytes moved by the kernel: upload bodies spliced from the socket into the "
            "file (in), blobs sent from the file (out); part of blob_bytes.",
            ["direction"],
            registry=self.registry,
        )
        self.blob_store_seconds = Histogram(
            "blob_store_seconds",
            "Time of blob store operations.",
            ["backend", "operation"],
            buckets=STORE_BUCKETS,
            registry=self.registry,
        )
        self.job_duration = Histogram(
            "job_duration_seconds",
            "Duration of finished job attempts, by kind and outcome.",
            ["kind", "outcome"],
            buckets=JOB_BUCKETS,
            registry=self.registry,
        )
        self.gc_runs = Counter(
            "gc_runs", "Garbage collection runs, by outcome.", ["outcome"], registry=self.registry
        )
        self.gc_reclaimed_bytes = Counter(
            "gc_reclaimed_bytes",
            "Bytes garbage collection removed from the blob store.",
            registry=self.registry,
        )
        self.tag_watches = Gauge(
            "tag_watches_in_flight",
            "Tag long-polls waiting for the tag to change.",
            multiprocess_mode="livesum",
            registry=self.registry,
        )
        for direction in ("in", "out"):  # present at 0 before the first transfer
            self.blob_bytes.labels(direction)
            self.blob_bytes_zero_copy.labels(direction)
        self._sources = _SourceCollector()
        self.registry.register(self._sources)
        if self.shared_directory is None:
            ProcessCollector(registry=self.registry)

    # sources read at scrape time ------------------------------------------------

    def set_queue_source(self, source: QueueSource) -> None:
        """Expose `jobs_queue_depth{kind,status}` from `source()` at each scrape."""
        self._sources.queue = source

    def set_worker_source(self, source: WorkerSource) -> None:
        """Expose `worker_last_heartbeat_timestamp_seconds{worker}` from `source()`."""
        self._sources.workers = source

    # observations ---------------------------------------------------------------

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.http_requests.labels(method, route, str(status)).inc()
        self.http_duration.labels(method, route).observe(seconds)

    def add_blob_bytes(self, direction: str, count: int) -> None:
        if count > 0:
            self.blob_bytes.labels(direction).inc(count)

    def add_zero_copy_bytes(self, direction: str, count: int) -> None:
        if count > 0:
            self.blob_bytes_zero_copy.labels(direction).inc(count)

    def observe_store(self, backend: str, operation: str, seconds: float) -> None:
        self.blob_store_seconds.labels(backend, operation).observe(seconds)

    def observe_job(self, kind: str, outcome: str, seconds: float) -> None:
        self.job_duration.labels(kind, outcome).observe(seconds)

    def add_tag_watches(self, delta: int) -> None:
        """A tag long-poll starts waiting (+1) or ends (-1)."""
        self.tag_watches.inc(delta)

    def observe_gc(self, *, outcome: str, bytes_reclaimed: int = 0) -> None:
        self.gc_runs.labels(outcome).inc()
        if bytes_reclaimed > 0:
            self.gc_reclaimed_bytes.inc(bytes_reclaimed)

    # exposition -----------------------------------------------------------------

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric (reads the sources); under
        several processes, their values summed."""
        if self.shared_directory is None:
            return generate_latest(self.registry)
        _forget_dead_processes(self.shared_directory)
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged, path=self.shared_directory)  # type: ignore[no-untyped-call]
        merged.register(self._sources)
        return generate_latest(merged)
