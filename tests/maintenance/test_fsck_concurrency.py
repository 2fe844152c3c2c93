"""`fsck` while clients push and garbage collection runs: no false errors.

fsck is held at its first blob read (a store that waits to be released,
around the real one); meanwhile a client pushes a new version and garbage
collection deletes an unreferenced blob that fsck has listed but not read.
Neither is a problem: the manifest is checked against the rows it was
accepted with, and the collected blob's row is gone when fsck looks again.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import update

from peftreg.digest import Digest
from peftreg.registry.app import build_services, create_app
from peftreg.registry.db.models import Blob
from peftreg.registry.maintenance.fsck import check_store
from peftreg.registry.maintenance.gc import collect_garbage
from peftreg.registry.settings import Settings
from peftreg.registry.storage.base import BlobStore
from tests.integration.oci_helpers import digest_of, make_artifact, push_artifact, push_blob

REPO = "acme/fsck-live"
GRACE = timedelta(minutes=10)


class FirstReadWaits:
    """The real store, whose first `read` waits until released."""

    def __init__(self, inner: BlobStore) -> None:
        self.inner = inner
        self.waiting = threading.Event()
        self.release = threading.Event()
        self._first = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def read(self, digest: Digest, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        if self._first.acquire(blocking=False):
            self.waiting.set()
            assert self.release.wait(60), "never released"
        return self.inner.read(digest, start, end)


def test_fsck_reports_nothing_for_a_push_and_a_collection_while_it_runs(tmp_path: Path) -> None:
    settings = Settings(
        home=tmp_path / "home", embedded_worker=False, gc_grace_seconds=GRACE.total_seconds()
    )
    services = build_services(settings)
    checker = build_services(settings)  # fsck, as run by `peftreg fsck` beside the server
    held = FirstReadWaits(checker.store)
    checker.store = held  # type: ignore[assignment]
    try:
        with (
            TestClient(create_app(settings, services)) as client,
            ThreadPoolExecutor(max_workers=1) as pool,
        ):
            before = make_artifact(b"a layer pushed before fsck" * 40, name="before")
            push_artifact(client, REPO, "v1", before)
            # Garbage that fsck lists, but reads after the first blob.
            first = min(digest_of(blob) for blob in before.blobs)
            garbage = next(
                data
                for data in (f"garbage {n}".encode() * 40 for n in range(100))
                if digest_of(data) > first
            )
            assert push_blob(client, REPO, garbage).status_code == 201
            with services.transaction() as session:
                session.execute(
                    update(Blob)
                    .where(Blob.digest == digest_of(garbage))
                    .values(touched_at=datetime.now(UTC) - timedelta(hours=1))
                )

            run = pool.submit(check_store, checker)
            try:
                assert held.waiting.wait(30)
                during = make_artifact(b"a layer pushed during fsck" * 40, name="during")
                push_artifact(client, REPO, "v2", during)
                collected = collect_garbage(services, dry_run=False, grace=GRACE)
                assert collected.removed == [digest_of(garbage)]
            finally:
                held.release.set()
            report = run.result(timeout=60)
        assert [problem.describe() for problem in report.problems] == []
        assert report.manifests_checked == 2
        assert check_store(services).problems == []  # and once everything has settled
    finally:
        services.engine.dispose()
        checker.engine.dispose()
