"""`/metrics` after a push and a pull, and the metrics the job system feeds."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from peftreg.registry.observability.metrics import Metrics
from peftreg.sdk import Client
from tests.fixtures.server import RegistryProcess

REPO = "acme/metrics"
MANIFEST_ROUTE = "/v2/{name}/manifests/{reference}"
BLOB_ROUTE = "/v2/{name}/blobs/{digest}"
FILES = {"adapter.safetensors": b"\x01\x02" * 3000, "README.md": b"# metrics\n" * 40}
CONFIG = b"{}"
WORKER_HEARTBEAT = "worker_last_heartbeat_timestamp_seconds"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def scrape(url: str) -> httpx.Response:
    response = httpx.get(f"{url}/metrics", timeout=30)
    assert response.status_code == 200
    return response


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def push_and_pull(url: str, work: Path) -> None:
    """What happens before the scrape (a job submitted and awaited belongs here too)."""
    source = work / "source"
    source.mkdir()
    for name, data in FILES.items():
        (source / name).write_bytes(data)
    with Client(url, cache=work / "cache") as sdk:
        sdk.push(source, f"{REPO}:v1")
        pulled = sdk.pull(f"{REPO}:v1", output=work / "pulled")
    for name, data in FILES.items():
        assert (pulled.path / name).read_bytes() == data


def test_metrics_after_a_push_and_a_pull(
    json_logging_server: RegistryProcess, tmp_path: Path
) -> None:
    url = json_logging_server.url
    before = parse(scrape(url).text)
    push_and_pull(url, tmp_path)
    response = scrape(url)
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    after = parse(response.text)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    put = {"method": "PUT", "route": MANIFEST_ROUTE}
    assert delta("http_requests_total", **put, status="201") == 1
    assert delta("http_request_duration_seconds_count", **put) == 1
    assert value(after, "http_request_duration_seconds_bucket", **put, le="+Inf") >= 1
    get_blob = {"method": "GET", "route": BLOB_ROUTE}
    assert delta("http_requests_total", **get_blob, status="200") == len(FILES)
    assert delta("http_requests_total", method="HEAD", route=BLOB_ROUTE, status="404") >= 1

    # Routes are templates: no label carries a repository name or a digest.
    routes = {dict(labels)["route"] for name, labels in after if name == "http_requests_total"}
    assert MANIFEST_ROUTE in routes
    assert "/metrics" in routes
    assert not any(REPO in route or "sha256:" in route for route in routes), routes

    uploaded = len(CONFIG) + sum(len(data) for data in FILES.values())
    assert delta("blob_bytes_total", direction="in") == uploaded
    assert delta("blob_bytes_total", direction="out") == sum(len(d) for d in FILES.values())

    store = {"backend": "filesystem"}
    # Small blobs go in one POST with their digest: published, no session committed.
    assert delta("blob_store_seconds_count", **store, operation="publish") == 3
    assert delta("blob_store_seconds_count", **store, operation="commit_upload") == 0
    # The blob GETs open the files, which the kernel sends (peftreg.registry.zero_copy).
    assert delta("blob_store_seconds_count", **store, operation="local_file") >= len(FILES)
    assert delta("blob_bytes_zero_copy_total", direction="out") == sum(
        len(d) for d in FILES.values()
    )
    # The upload bodies went from the socket into the sessions' files.
    assert delta("blob_bytes_zero_copy_total", direction="in") == uploaded
    assert (
        value(after, "blob_store_seconds_bucket", **store, operation="local_file", le="+Inf") >= 2
    )

    # The job system's gauges, read from the database at scrape time: the
    # embedded worker's heartbeat, and the queue (empty until a job is asked for).
    assert "# TYPE jobs_queue_depth gauge" in response.text
    (heartbeat,) = (v for (n, _), v in after.items() if n == WORKER_HEARTBEAT)
    assert abs(heartbeat - time.time()) < 600


def test_job_metrics_come_from_the_sources_the_app_registers() -> None:
    metrics = Metrics()
    text = metrics.render().decode()
    assert "jobs_queue_depth" not in text, "no source yet: no gauge"
    depth: dict[tuple[str, str], int] = {("merge", "queued"): 2, ("merge", "running"): 1}
    metrics.set_queue_source(lambda: depth)
    metrics.set_worker_source(lambda: {"worker-a": 1_700_000_000.5})
    metrics.observe_job("merge", "succeeded", 12.5)
    metrics.observe_job("merge", "failed", 0.2)

    samples = parse(metrics.render().decode())
    assert value(samples, "jobs_queue_depth", kind="merge", status="queued") == 2
    assert value(samples, "jobs_queue_depth", kind="merge", status="running") == 1
    assert value(samples, "worker_last_heartbeat_timestamp_seconds", worker="worker-a") == (
        1_700_000_000.5
    )
    succeeded = {"kind": "merge", "outcome": "succeeded"}
    assert value(samples, "job_duration_seconds_count", **succeeded) == 1
    assert value(samples, "job_duration_seconds_sum", **succeeded) == 12.5
    assert value(samples, "job_duration_seconds_count", kind="merge", outcome="failed") == 1

    # The gauges are read at each scrape, and a failing source does not fail it.
    depth[("merge", "queued")] = 0

    def failing() -> dict[str, float]:
        raise RuntimeError("database unavailable")

    metrics.set_worker_source(failing)
    text = metrics.render().decode()
    assert 'jobs_queue_depth{kind="merge",status="queued"} 0.0' in text
    assert "worker-a" not in text


def test_metrics_after_an_export_job(registry_server: RegistryProcess, tmp_path: Path) -> None:
    from tests.jobs.artifacts import push_base_and_adapter

    with Client(registry_server.url, cache=tmp_path / "cache") as sdk:
        pushed = push_base_and_adapter(sdk, tmp_path)
        job, _ = sdk.export(pushed.adapter_ref, pushed.base_ref)
        sdk.wait_job(job.id, timeout=120)
    text = scrape(registry_server.url).text
    samples = parse(text)
    done = {"kind": "export", "outcome": "succeeded"}
    assert value(samples, "job_duration_seconds_count", **done) == 1
    assert value(samples, "job_duration_seconds_sum", **done) > 0
    # The queue gauge is exposed (its source is wired), and the finished job left it.
    assert "# TYPE jobs_queue_depth gauge" in text
    exports_waiting = {
        dict(labels)["status"]: count
        for (name, labels), count in samples.items()
        if name == "jobs_queue_depth" and dict(labels)["kind"] == "export"
    }
    assert not any(exports_waiting.values()), exports_waiting
    exports = {"method": "POST", "route": "/api/v1/exports"}
    assert value(samples, "http_requests_total", **exports, status="202") == 1
