"""The races of `peftreg.registry.maintenance.gc`'s docstring, forced one interleaving at a time.

On PostgreSQL, the test's own transaction takes the lock garbage collection
(or a push) would hold, starts the other side in a thread, waits until that
side is blocked on the lock (seen in `pg_stat_activity`), then does what
the lock holder does and commits. No timing is left to chance: each test
fails without the mechanism it checks.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import delete, select, text, update
from sqlalchemy.orm import Session

from peftreg.digest import Digest
from peftreg.manifest import OCI_MANIFEST
from peftreg.registry.app import build_services, create_app
from peftreg.registry.auth.scopes import anonymous_principal
from peftreg.registry.catalog.blobs import lock_digest
from peftreg.registry.catalog.manifests import put_manifest
from peftreg.registry.db.models import Blob, RepositoryBlob
from peftreg.registry.maintenance.fsck import check_store
from peftreg.registry.maintenance.gc import GcReport, collect_garbage
from peftreg.registry.settings import Settings
from peftreg.registry.state import Services
from tests.fixtures.postgres import fresh_database, postgres_admin_url
from tests.integration.oci_helpers import digest_of, make_artifact, push_blob

pytestmark = pytest.mark.postgres

REPO = "acme/interleaved"
GRACE = timedelta(minutes=10)
T = TypeVar("T")


@pytest.fixture
def services(tmp_path: Path) -> Iterator[Services]:
    with fresh_database(postgres_admin_url()) as url:
        settings = Settings(
            home=tmp_path / "home",
            database_url=url,
            auto_migrate=True,
            embedded_worker=False,
            gc_grace_seconds=GRACE.total_seconds(),
        )
        built = build_services(settings)
        try:
            yield built
        finally:
            built.engine.dispose()


@pytest.fixture
def client(services: Services) -> Iterator[TestClient]:
    with TestClient(create_app(services.settings, services)) as test_client:
        yield test_client


@pytest.fixture
def other_side() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=2) as pool:
        yield pool


def age(services: Services, *digests: str) -> None:
    """Last touched an hour ago: older than the grace period (and half of it)."""
    with services.transaction() as session:
        session.execute(
            update(Blob)
            .where(Blob.digest.in_(digests))
            .values(touched_at=datetime.now(UTC) - timedelta(hours=1))
        )


def lock_waiters(services: Services) -> int:
    with services.engine.connect() as connection:
        waiting = connection.scalar(
            text(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
        )
    return int(waiting or 0)


def wait_blocked(services: Services, *work: Future[T], count: int = 1) -> None:
    """Until `count` sessions wait for a lock; fails if the work finished without waiting."""
    deadline = time.monotonic() + 30
    while lock_waiters(services) < count:
        finished = [future for future in work if future.done()]
        assert not finished, f"finished without waiting for the lock: {finished[0].result()!r}"
        assert time.monotonic() < deadline, "nothing ever waited for the lock"
        time.sleep(0.01)  # polling a condition with a deadline


def lock_for_gc(session: Session, digest: str) -> None:
    """What step A holds: the blob row locked FOR UPDATE."""
    locked = session.scalars(select(Blob.digest).where(Blob.digest == digest).with_for_update())
    assert list(locked) == [digest]


def delete_as_gc(session: Session, digest: str) -> None:
    """The rest of step A: the row and its links go, and the transaction commits."""
    session.execute(delete(RepositoryBlob).where(RepositoryBlob.digest == digest))
    session.execute(delete(Blob).where(Blob.digest == digest))
    session.commit()


def in_thread(pool: ThreadPoolExecutor, work: Callable[[], T]) -> Future[T]:
    return pool.submit(work)


def test_upload_commit_waits_for_gc_then_records_the_blob_again(
    services: Services, client: TestClient, other_side: ThreadPoolExecutor
) -> None:
    data = b"pushed twice, collected in between" * 40
    digest = digest_of(data)
    assert push_blob(client, REPO, data).status_code == 201
    age(services, digest)
    # A second push of the same bytes, up to its commit (PUT ?digest=).
    started = client.post(f"/v2/{REPO}/blobs/uploads/")
    patched = client.patch(started.headers["Location"], content=data)
    assert patched.status_code == 202, patched.text

    with services.sessions() as gc:
        lock_for_gc(gc, digest)
        # The store commit is a no-op (the bytes are there); the row waits for GC.
        commit = in_thread(
            other_side, lambda: client.put(patched.headers["Location"], params={"digest": digest})
        )
        wait_blocked(services, commit)
        delete_as_gc(gc, digest)
    response = commit.result(timeout=60)
    assert response.status_code == 201, response.text

    with services.transaction() as session:
        assert session.get(Blob, digest) is not None
        assert session.scalars(
            select(RepositoryBlob.digest).where(RepositoryBlob.digest == digest)
        ).all() == [digest]
    assert client.get(f"/v2/{REPO}/blobs/{digest}").content == data
    # GC's step B (here: a whole run) finds the row and keeps the bytes.
    assert collect_garbage(services, dry_run=False, grace=GRACE).removed == []
    assert client.get(f"/v2/{REPO}/blobs/{digest}").content == data
    assert check_store(services).problems == []


def test_head_waits_for_gc_and_answers_404_once_it_deleted_the_blob(
    services: Services, client: TestClient, other_side: ThreadPoolExecutor
) -> None:
    data = b"checked while being collected" * 40
    digest = digest_of(data)
    assert push_blob(client, REPO, data).status_code == 201
    age(services, digest)

    with services.sessions() as gc:
        lock_for_gc(gc, digest)
        head = in_thread(other_side, lambda: client.head(f"/v2/{REPO}/blobs/{digest}"))
        wait_blocked(services, head)
        delete_as_gc(gc, digest)
    # "Exists" would make the client skip an upload of bytes about to vanish.
    assert head.result(timeout=60).status_code == 404


def test_head_of_a_recently_touched_blob_writes_nothing(
    services: Services, client: TestClient, other_side: ThreadPoolExecutor
) -> None:
    data = b"checked often" * 40
    digest = digest_of(data)
    assert push_blob(client, REPO, data).status_code == 201
    with services.sessions() as holder:
        lock_for_gc(holder, digest)  # an UPDATE of the row would wait for this
        head = in_thread(other_side, lambda: client.head(f"/v2/{REPO}/blobs/{digest}"))
        deadline = time.monotonic() + 30
        while not head.done():
            assert lock_waiters(services) == 0, "the HEAD waits to write the blob row"
            assert time.monotonic() < deadline
            time.sleep(0.01)  # polling a condition with a deadline
        holder.rollback()
    assert head.result().status_code == 200


def test_manifest_put_holding_its_blobs_keeps_them_from_gc(
    services: Services, client: TestClient, other_side: ThreadPoolExecutor
) -> None:
    artifact = make_artifact(b"a layer named by a manifest in flight" * 40, name="inflight")
    for blob in artifact.blobs:
        assert push_blob(client, REPO, blob).status_code == 201
    digests = [digest_of(blob) for blob in artifact.blobs]
    age(services, *digests)

    with services.sessions() as push:
        # The manifest PUT, up to its commit: its blob rows are held FOR SHARE.
        put_manifest(
            push,
            principal=anonymous_principal("admin"),
            repository=REPO,
            reference="v1",
            content=artifact.manifest,
            content_type=OCI_MANIFEST,
        )
        collection = in_thread(
            other_side, lambda: collect_garbage(services, dry_run=False, grace=GRACE)
        )
        # GC skips the held rows (or, were it to wait, re-checks after the commit).
        deadline = time.monotonic() + 30
        while not collection.done() and lock_waiters(services) == 0:
            assert time.monotonic() < deadline, "GC neither finished nor waited"
            time.sleep(0.01)  # polling a condition with a deadline
        push.commit()
    report = collection.result(timeout=60)
    assert not set(report.removed) & set(digests), report.removed
    assert report.blobs_removed == 0

    assert collect_garbage(services, dry_run=False, grace=GRACE).removed == []
    for blob in artifact.blobs:
        assert client.get(f"/v2/{REPO}/blobs/{digest_of(blob)}").content == blob
    assert check_store(services).problems == []


def test_concurrent_collectors_count_each_deleted_byte_once(
    services: Services, client: TestClient, other_side: ThreadPoolExecutor
) -> None:
    data = b"bytes two collectors race to delete" * 50
    digest = digest_of(data)
    assert push_blob(client, REPO, data).status_code == 201
    # Step A of an earlier run committed; its step B has not run: bytes, no row.
    with services.sessions() as session:
        delete_as_gc(session, digest)

    with services.sessions() as holder:
        lock_digest(holder, Digest.parse(digest))
        runs = [
            in_thread(other_side, lambda: collect_garbage(services, dry_run=False, grace=GRACE))
            for _ in range(2)
        ]
        wait_blocked(services, *runs, count=2)  # both are about to delete the same bytes
        holder.rollback()
    reports: list[GcReport] = [run.result(timeout=60) for run in runs]

    assert sum(report.bytes_reclaimed for report in reports) == len(data)
    assert sum(report.orphans_removed for report in reports) == 1
    assert [digest for report in reports for digest in report.removed] == [digest]
    assert {str(stored) for stored in services.store.list_digests()} == set()
