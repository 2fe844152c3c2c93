"""Garbage collection, step by step: what touches a blob, the grace period, the periodic thread.

These run the app in this process (FastAPI's TestClient runs its lifespan,
so the periodic GC thread starts as under `peftreg serve`), on SQLite and
the filesystem store.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import update

from client.cli.main import cli
from registry.app import build_services, create_app
from registry.db.models import Blob
from registry.maintenance.gc import collect_garbage
from registry.settings import Settings
from registry.state import Services
from tests.integration.oci_helpers import (
    digest_of,
    error_codes,
    make_artifact,
    push_blob,
    push_manifest,
)

REPO = "acme/gc"
GRACE = timedelta(minutes=10)


@pytest.fixture
def services(tmp_path: Path) -> Iterator[Services]:
    built = build_services(Settings(home=tmp_path / "home", embedded_worker=False))
    yield built
    built.engine.dispose()


@pytest.fixture
def client(services: Services) -> Iterator[TestClient]:
    with TestClient(create_app(services.settings, services)) as test_client:
        yield test_client


def age(services: Services, *blobs: bytes) -> None:
    """Make blobs look untouched for an hour (older than the grace period)."""
    with services.transaction() as session:
        session.execute(
            update(Blob)
            .where(Blob.digest.in_([digest_of(blob) for blob in blobs]))
            .values(touched_at=datetime.now(UTC) - timedelta(hours=1))
        )


def collect(services: Services) -> set[str]:
    return set(collect_garbage(services, dry_run=False, grace=GRACE).removed)


def test_only_old_unreferenced_blobs_go(services: Services, client: TestClient) -> None:
    referenced = make_artifact(b"a layer a manifest names" * 10, name="kept")
    for blob in referenced.blobs:
        assert push_blob(client, REPO, blob).status_code == 201
    assert push_manifest(client, REPO, "v1", referenced.manifest).status_code == 201
    old, young = b"old and unreferenced" * 10, b"young and unreferenced" * 10
    for blob in (old, young):
        assert push_blob(client, REPO, blob).status_code == 201
    age(services, old, *referenced.blobs)

    dry = collect_garbage(services, dry_run=True, grace=GRACE)
    assert dry.removed == [digest_of(old)]
    assert (dry.bytes_reclaimed, dry.repository_links_removed) == (len(old), 1)
    assert client.get(f"/v2/{REPO}/blobs/{digest_of(old)}").status_code == 200

    report = collect_garbage(services, dry_run=False, grace=GRACE)
    assert report.removed == [digest_of(old)]
    assert (report.blobs_removed, report.bytes_reclaimed) == (1, len(old))
    assert client.get(f"/v2/{REPO}/blobs/{digest_of(old)}").status_code == 404
    for blob in (young, *referenced.blobs):
        assert client.get(f"/v2/{REPO}/blobs/{digest_of(blob)}").content == blob
    events = client.get("/api/v1/audit").json()
    run = next(event for event in events if event["action"] == "gc.run")
    assert run["actor"] == "gc"
    assert run["detail"]["bytes_reclaimed"] == len(old)


def test_head_and_mount_keep_a_blob_for_the_grace_period(
    services: Services, client: TestClient
) -> None:
    headed, mounted, forgotten = (f"{name} blob".encode() * 20 for name in ("h", "m", "f"))
    for blob in (headed, mounted, forgotten):
        assert push_blob(client, REPO, blob).status_code == 201
    age(services, headed, mounted, forgotten)

    # What a pushing client does before naming blobs in a manifest.
    assert client.head(f"/v2/{REPO}/blobs/{digest_of(headed)}").status_code == 200
    mount = client.post(
        "/v2/acme/other/blobs/uploads/", params={"mount": digest_of(mounted), "from": REPO}
    )
    assert mount.status_code == 201, mount.text
    # A GET is a read, not a promise to use: it does not refresh the blob.
    assert client.get(f"/v2/{REPO}/blobs/{digest_of(forgotten)}").status_code == 200

    assert collect(services) == {digest_of(forgotten)}
    artifact = make_artifact(headed, mounted, name="late")
    assert push_blob(client, REPO, artifact.config).status_code == 201
    assert push_manifest(client, REPO, "v1", artifact.manifest).status_code == 201

    # Past the grace period the client's HEAD no longer protects the blob: a
    # manifest naming it is refused rather than pointing at deleted bytes.
    late = b"checked, then forgotten for too long" * 5
    assert push_blob(client, REPO, late).status_code == 201
    assert client.head(f"/v2/{REPO}/blobs/{digest_of(late)}").status_code == 200
    age(services, late)
    assert collect(services) == {digest_of(late)}
    refused = push_manifest(client, REPO, "v2", make_artifact(late, name="late").manifest)
    assert refused.status_code == 400
    assert error_codes(refused) == ["MANIFEST_BLOB_UNKNOWN"]
    assert client.head(f"/v2/{REPO}/blobs/{digest_of(late)}").status_code == 404
    assert push_blob(client, REPO, late).status_code == 201
    assert client.get(f"/v2/{REPO}/blobs/{digest_of(late)}").content == late


def test_periodic_gc_runs_beside_the_api(tmp_path: Path) -> None:
    settings = Settings(
        home=tmp_path / "home",
        embedded_worker=False,
        gc_interval_seconds=0.2,
        gc_grace_seconds=600,
    )
    services = build_services(settings)
    garbage = b"collected by the server's own thread" * 10
    try:
        with TestClient(create_app(settings, services)) as client:
            assert push_blob(client, REPO, garbage).status_code == 201
            age(services, garbage)
            deadline = time.monotonic() + 20
            while client.get(f"/v2/{REPO}/blobs/{digest_of(garbage)}").status_code == 200:
                assert time.monotonic() < deadline, "the periodic GC never removed the blob"
                time.sleep(0.05)  # polling a condition with a deadline
            samples = {
                (sample.name, sample.labels.get("outcome")): sample.value
                for family in text_string_to_metric_families(client.get("/metrics").text)
                for sample in family.samples
            }
            assert samples[("gc_runs_total", "ok")] >= 1
            assert samples[("gc_reclaimed_bytes_total", None)] == len(garbage)
        # The thread ends with the app.
        assert "periodic-gc" not in {thread.name for thread in threading.enumerate()}
    finally:
        services.engine.dispose()


def test_gc_cli(tmp_path: Path) -> None:
    env = {"PEFTREG_HOME": str(tmp_path / "home")}
    refused = CliRunner().invoke(cli, ["gc", "--grace", "soon"], env=env)
    assert refused.exit_code == 2
    assert "'soon' is not a duration like 90s, 30m, 24h or 7d" in refused.output

    dry = CliRunner().invoke(cli, ["gc", "--dry-run", "--grace", "1h"], env=env)
    assert dry.exit_code == 0, dry.output
    assert dry.stdout.startswith(
        "gc: would remove 0 blob(s) and 0 orphaned object(s), 0 B (0 bytes)"
    )
