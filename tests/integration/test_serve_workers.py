"""`peftreg serve --workers N`, and HTTP caching of what is addressed by digest."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import get_args

import httpx
import pytest

from peftreg.adapters.quantization_names import BASE_QUANTIZATIONS
from peftreg.adapters.schema import BaseQuantization
from tests.fixtures.server import RegistryProcess, clean_environment
from tests.integration.test_oci_api import manifest_bytes, put_manifest, sha256


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryProcess]:
    home = tmp_path_factory.mktemp("workers") / "home"
    process = RegistryProcess(
        home=home,
        env={**clean_environment(), "PEFTREG_GC_INTERVAL_SECONDS": "3600"},
        serve_args=["--workers", "2", "--log-level", "info"],
    ).start()
    yield process
    process.stop()


def _log_lines(server: RegistryProcess, needle: str, count: int) -> list[str]:
    """Lines of the server log holding `needle`, once at least `count` are there."""
    deadline = time.monotonic() + 60
    while True:
        found = [line for line in server.log_path.read_text().splitlines() if needle in line]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.1)  # polling a log with a deadline, not ordering by sleep


def test_workers_serve_and_background_work_runs_once(server: RegistryProcess) -> None:
    assert len(_log_lines(server, "Application startup complete", 2)) == 2
    # The job worker and periodic GC run in the supervising process only.
    assert len(_log_lines(server, "peftreg.registry.jobs.worker worker", 1)) == 1
    log = server.log_path.read_text()
    assert log.count("Running upgrade") == 6  # migrated once, before the workers started
    with httpx.Client(base_url=server.url) as client:
        for _ in range(8):
            assert client.get("/v2/").status_code == 200


def test_manifests_by_digest_are_immutable_and_by_tag_revalidated(
    server: RegistryProcess,
) -> None:
    with httpx.Client(base_url=server.url) as client:
        content = manifest_bytes(client, "acme/cache", layers=[b"layer bytes"])
        digest = put_manifest(client, "acme/cache", "v1", content).headers["docker-content-digest"]
        layer = sha256(b"layer bytes")

        by_digest = client.get(f"/v2/acme/cache/manifests/{digest}")
        assert by_digest.headers["etag"] == f'"{digest}"'
        assert "immutable" in by_digest.headers["cache-control"]
        again = client.get(
            f"/v2/acme/cache/manifests/{digest}", headers={"If-None-Match": f'"{digest}"'}
        )
        assert again.status_code == 304
        assert again.content == b""

        by_tag = client.get("/v2/acme/cache/manifests/v1")
        assert by_tag.headers["etag"] == f'"{digest}"'
        assert by_tag.headers["cache-control"] == "private, no-cache"
        other = client.get("/v2/acme/cache/manifests/v1", headers={"If-None-Match": '"x"'})
        assert other.status_code == 200
        assert other.content == content

        blob = client.get(f"/v2/acme/cache/blobs/{layer}")
        assert blob.content == b"layer bytes"
        assert "immutable" in blob.headers["cache-control"]


def test_the_cli_quantization_choices_are_the_schema_ones() -> None:
    assert get_args(BaseQuantization) == BASE_QUANTIZATIONS


def _scrape(url: str) -> dict[str, float]:
    """One scrape on a new connection (either worker may answer): sample -> value."""
    body = httpx.get(f"{url}/metrics", timeout=10).text
    return {
        line.rpartition(" ")[0]: float(line.rpartition(" ")[2])
        for line in body.splitlines()
        if line and not line.startswith("#")
    }


@pytest.mark.parametrize("workers", [2, 1])
def test_every_scrape_sums_the_metrics_of_every_process(tmp_path: Path, workers: int) -> None:
    """Requests served by either worker and the gc runs of the supervisor (which serves no
    HTTP) are counted in every scrape, whichever worker answers it. A directory named by
    PROMETHEUS_MULTIPROC_DIR is used, emptied of an earlier run's files first, with one
    process too."""
    shared = tmp_path / "metrics"
    shared.mkdir()
    (shared / "counter_999999.db").write_bytes(b"not a metrics file of this run")
    process = RegistryProcess(
        home=tmp_path / "home",
        env={
            **clean_environment(),
            "PEFTREG_GC_INTERVAL_SECONDS": "1",
            "PROMETHEUS_MULTIPROC_DIR": str(shared),
        },
        serve_args=["--workers", str(workers), "--log-level", "warning"],
    ).start()
    try:
        for _ in range(12):  # each on a new connection, served by either worker
            assert httpx.get(f"{process.url}/v2/", timeout=10).status_code == 200
        deadline = time.monotonic() + 60
        while True:
            scrapes = [_scrape(process.url) for _ in range(6)]
            if all(scrape.get('gc_runs_total{outcome="ok"}', 0) >= 1 for scrape in scrapes):
                break
            assert time.monotonic() < deadline, "the supervisor's gc runs never showed"
            time.sleep(0.2)  # polling with a deadline: the gc runs every second
    finally:
        process.stop()
    served = 'http_requests_total{method="GET",route="/v2/",status="200"}'
    assert {scrape[served] for scrape in scrapes} == {12.0}
    assert all(scrape["tag_watches_in_flight"] == 0 for scrape in scrapes)
    assert not any(name.startswith("process_") for scrape in scrapes for name in scrape)
    assert not (shared / "counter_999999.db").exists()
