"""Garbage collection, step by step: what touches a blob, the grace period, the periodic thread.

These run the app in this process (FastAPI's TestClient runs its lifespan,
so the periodic GC thread starts as under `peftreg serve`), on SQLite and
the filesystem store.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select, update

from peftreg.cli.main import cli
from peftreg.digest import Digest
from peftreg.registry.app import build_services, create_app
from peftreg.registry.db.models import AuditEvent, Blob, UploadSession
from peftreg.registry.maintenance.fsck import check_store
from peftreg.registry.maintenance.gc import collect_garbage
from peftreg.registry.settings import Settings
from peftreg.registry.state import Services
from tests.fixtures.server import clean_environment
from tests.integration.oci_helpers import (
    digest_of,
    error_codes,
    make_artifact,
    push_blob,
    push_manifest,
)
from tests.maintenance.conftest import Backend

REPO = "acme/gc"
GRACE = timedelta(minutes=10)


@pytest.fixture
def services(tmp_path: Path) -> Iterator[Services]:
    settings = Settings(
        home=tmp_path / "home", embedded_worker=False, gc_grace_seconds=GRACE.total_seconds()
    )
    built = build_services(settings)
    yield built
    built.engine.dispose()


@pytest.fixture
def client(services: Services) -> Iterator[TestClient]:
    with TestClient(create_app(services.settings, services)) as test_client:
        yield test_client


def age(services: Services, *blobs: bytes, by: timedelta = timedelta(hours=1)) -> None:
    """Make blobs look untouched for an hour (older than the grace period), or `by`."""
    with services.transaction() as session:
        session.execute(
            update(Blob)
            .where(Blob.digest.in_([digest_of(blob) for blob in blobs]))
            .values(touched_at=datetime.now(UTC) - by)
        )


def touched_at(services: Services, blob: bytes) -> datetime:
    with services.transaction() as session:
        row = session.get(Blob, digest_of(blob))
        assert row is not None
        return row.touched_at


def blob_file(services: Services, blob: bytes) -> Path:
    digest = Digest.parse(digest_of(blob))
    root = services.settings.home / "storage"
    return root / "blobs" / digest.algorithm / digest.hex[:2] / digest.hex


def last_gc_audit(services: Services) -> dict[str, object]:
    with services.transaction() as session:
        event = session.scalars(
            select(AuditEvent).where(AuditEvent.action == "gc.run").order_by(AuditEvent.id.desc())
        ).first()
        assert event is not None
        return dict(event.detail)


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

    # Below the floor, only on purpose.
    short = CliRunner().invoke(cli, ["gc", "--grace", "5m"], env=env)
    assert short.exit_code == 2
    assert "5 minutes is shorter than 10 minutes" in short.stderr
    assert "--force" in short.stderr
    forced = CliRunner().invoke(cli, ["gc", "--grace", "5m", "--force", "--dry-run"], env=env)
    assert forced.exit_code == 0, forced.output


def one_line_failure(result: Result) -> str:
    """The single stderr line of a command that failed cleanly (exit 1, no traceback)."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    (line,) = result.stderr.splitlines()
    return line


def test_maintenance_cli_reports_backend_failures_in_one_line(tmp_path: Path) -> None:
    home = str(tmp_path / "home")
    unreachable = {
        "PEFTREG_HOME": home,
        "PEFTREG_DATABASE_URL": "postgresql+psycopg://peftreg@127.0.0.1:1/peftreg",
    }
    for command in (["gc", "--dry-run"], ["fsck"]):
        line = one_line_failure(CliRunner().invoke(cli, command, env=unreachable))
        assert line.startswith(f"peftreg: {command[0]} failed: ")
        assert "127.0.0.1" in line
    # As an operator sees it: with logging unconfigured, nothing else reaches stderr.
    ran = subprocess.run(
        [sys.executable, "-m", "peftreg.cli.main", "gc", "--dry-run"],
        env={**clean_environment(), **unreachable},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert ran.returncode == 1
    (only,) = ran.stderr.splitlines()
    assert only.startswith("peftreg: gc failed: ")
    assert "127.0.0.1" in only

    not_a_directory = tmp_path / "a-file"
    not_a_directory.write_text("")
    line = one_line_failure(
        CliRunner().invoke(cli, ["gc"], env={"PEFTREG_HOME": str(not_a_directory)})
    )
    assert line.startswith("peftreg: gc failed: ")

    invalid = {"PEFTREG_HOME": home, "PEFTREG_GC_GRACE_SECONDS": "-5"}
    line = one_line_failure(CliRunner().invoke(cli, ["gc"], env=invalid))
    assert line.startswith("peftreg: gc: invalid setting gc_grace_seconds: ")


def test_head_refreshes_a_blob_only_once_half_the_grace_has_passed(
    services: Services, client: TestClient
) -> None:
    blob = b"checked by every push of a popular base" * 10
    assert push_blob(client, REPO, blob).status_code == 201
    url = f"/v2/{REPO}/blobs/{digest_of(blob)}"

    age(services, blob, by=GRACE / 2 - timedelta(minutes=1))
    recent = touched_at(services, blob)
    assert client.head(url).status_code == 200
    assert touched_at(services, blob) == recent, "a HEAD of a recently touched blob wrote its row"

    age(services, blob, by=GRACE / 2 + timedelta(minutes=1))
    before = datetime.now(UTC)
    assert client.head(url).status_code == 200
    assert touched_at(services, blob) >= before - timedelta(seconds=1)
    assert collect(services) == set()


def test_stray_files_in_the_store_are_skipped(
    services: Services, client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    garbage = b"unreferenced, beside a stray file" * 10
    assert push_blob(client, REPO, garbage).status_code == 201
    age(services, garbage)
    path = blob_file(services, garbage)
    strays = [
        path.with_name(path.name + "~"),  # an editor's backup
        path.parent.parent / "zz" / path.name,  # a blob under the wrong prefix
        path.parent.parent / "notes.txt",  # a file where a prefix directory belongs
    ]
    for stray in strays:
        stray.parent.mkdir(parents=True, exist_ok=True)
        stray.write_bytes(b"not a blob")
    (path.parent / ("0" * 64)).mkdir()  # a directory where a blob file belongs

    with caplog.at_level(logging.WARNING, logger="peftreg.registry.storage.filesystem"):
        assert [str(d) for d in services.store.list_digests()] == [digest_of(garbage)]
        assert collect(services) == {digest_of(garbage)}
    assert all(stray.exists() for stray in strays), "GC deletes only blobs"
    assert sum("not a blob of this store" in r.getMessage() for r in caplog.records) >= 4
    assert check_store(services).problems == []


def test_a_failing_run_audits_the_work_it_did(services: Services, client: TestClient) -> None:
    first, second = sorted(
        (b"garbage collected before the failure" * 10, b"garbage GC cannot delete" * 10),
        key=digest_of,
    )
    for blob in (first, second):
        assert push_blob(client, REPO, blob).status_code == 201
    age(services, first, second)
    # The store refuses to delete the second blob: a directory stands in its place.
    blocked = blob_file(services, second)
    blocked.unlink()
    blocked.mkdir()

    with pytest.raises(IsADirectoryError):
        collect_garbage(services, dry_run=False, grace=GRACE, batch=1)
    detail = last_gc_audit(services)
    assert detail["blobs_removed"] == 1
    assert detail["bytes_reclaimed"] == len(first)
    assert detail["repository_links_removed"] == 2  # both rows were deleted (step A)
    assert "Is a directory" in str(detail["error"])
    assert client.get(f"/v2/{REPO}/blobs/{digest_of(first)}").status_code == 404


def test_a_stop_request_ends_the_run_between_batches(
    services: Services, client: TestClient
) -> None:
    garbage = [f"garbage {index}".encode() * 20 for index in range(3)]
    for blob in garbage:
        assert push_blob(client, REPO, blob).status_code == 201
    age(services, *garbage)
    stop = threading.Event()
    stop.set()  # shutdown began before the run

    report = collect_garbage(services, dry_run=False, grace=GRACE, batch=1, stop=stop)
    assert report.interrupted
    assert (report.blobs_removed, report.removed) == (0, [])
    assert last_gc_audit(services)["interrupted"] is True
    assert collect(services) == {digest_of(blob) for blob in garbage}


def test_an_expired_upload_goes_row_first_and_its_bytes_once_idle(
    services: Services, client: TestClient
) -> None:
    started = client.post(f"/v2/{REPO}/blobs/uploads/")
    upload_id = started.headers["Docker-Upload-UUID"]
    assert client.patch(started.headers["Location"], content=b"half a blob").status_code == 202
    two_days_ago = datetime.now(UTC) - timedelta(days=2)
    with services.transaction() as session:
        session.execute(
            update(UploadSession)
            .where(UploadSession.id == upload_id)
            .values(updated_at=two_days_ago)
        )
    data = services.settings.home / "storage" / "uploads" / upload_id / "data"

    # A request is writing to the session right now: its bytes stay, the row goes.
    writer = services.store.open_writer(upload_id, len(b"half a blob"))
    try:
        assert collect_garbage(services, dry_run=False, grace=GRACE).uploads_removed == 1
        assert data.exists()
    finally:
        writer.close()
    assert client.get(started.headers["Location"]).status_code == 404
    os.utime(data, (two_days_ago.timestamp(), two_days_ago.timestamp()))
    assert collect_garbage(services, dry_run=False, grace=GRACE).uploads_removed == 1
    assert not data.parent.exists()


def test_gc_drops_a_whole_blob_write_a_dead_process_left_once_it_is_expired(
    backend: Backend,
) -> None:
    """`open_blob` writes have no session row (on S3 they are multipart uploads at the
    blob's key): one older than the upload expiry goes; a recent one is spared."""
    data = os.urandom(9 * 1024 * 1024)
    digest = Digest.of_bytes(data)
    default = build_services(backend.settings())
    expired = build_services(backend.settings().model_copy(update={"upload_expiry_seconds": 0}))
    try:
        writer = default.store.open_blob(digest)
        writer.write(data)
        writer.close()  # the process dies here
        assert collect_garbage(default, dry_run=False, grace=timedelta(0)).uploads_removed == 0
        assert collect_garbage(expired, dry_run=True, grace=timedelta(0)).uploads_removed == 1

        assert collect_garbage(expired, dry_run=False, grace=timedelta(0)).uploads_removed == 1

        assert list(default.store.list_uploads()) == []
        assert default.store.abort_blob_writes(datetime.now(UTC) + timedelta(minutes=5)) == 0
        assert list(default.store.list_digests()) == []
    finally:
        default.engine.dispose()
        expired.engine.dispose()
