"""Blob GETs beside garbage collection: bytes gone after the lookup, a slow store.

A GET looks the blob up in the database, then opens it in the store. Bytes
collected in between answer 404 `BLOB_UNKNOWN` (what the same GET answers a
moment later), not 500. Opening the blob is the backend's request (an S3
GetObject): it runs on a worker thread, so the server answers other requests
while it waits.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from peftreg.digest import Digest
from peftreg.registry.app import build_services, create_app
from peftreg.registry.settings import Settings
from peftreg.registry.state import Services
from peftreg.registry.storage.base import BlobStore
from tests.integration.oci_helpers import digest_of, error_codes, push_blob

REPO = "acme/reads"


class SlowReads:
    """The real store, whose `read` waits until released: a slow backend request."""

    def __init__(self, inner: BlobStore) -> None:
        self.inner = inner
        self.reading = threading.Event()
        self.release = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def read(self, digest: Digest, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        self.reading.set()
        assert self.release.wait(60), "never released"
        return self.inner.read(digest, start, end)


@pytest.fixture
def services(tmp_path: Path) -> Iterator[Services]:
    built = build_services(Settings(home=tmp_path / "home", embedded_worker=False))
    yield built
    built.engine.dispose()


def test_a_blob_collected_after_its_lookup_is_unknown(services: Services) -> None:
    data = b"looked up, then collected" * 40
    with TestClient(create_app(services.settings, services)) as client:
        assert push_blob(client, REPO, data).status_code == 201
        # The bytes go between the lookup and the read: as if collected just now.
        services.store.delete(Digest.parse(digest_of(data)))
        response = client.get(f"/v2/{REPO}/blobs/{digest_of(data)}")
        assert response.status_code == 404, response.text
        assert error_codes(response) == ["BLOB_UNKNOWN"]
        ranged = client.get(f"/v2/{REPO}/blobs/{digest_of(data)}", headers={"Range": "bytes=0-9"})
        assert ranged.status_code == 404


def test_a_slow_store_read_leaves_the_server_responsive(services: Services) -> None:
    data = b"read from a slow store" * 40
    slow = SlowReads(services.store)
    services.store = slow  # type: ignore[assignment]
    with (
        TestClient(create_app(services.settings, services)) as client,
        ThreadPoolExecutor(max_workers=2) as pool,
    ):
        assert push_blob(client, REPO, data).status_code == 201
        download = pool.submit(client.get, f"/v2/{REPO}/blobs/{digest_of(data)}")
        try:
            assert slow.reading.wait(30)
            health = pool.submit(client.get, "/healthz")
            # Served while the read waits: the event loop is not the one waiting.
            assert health.result(timeout=10).status_code == 200
        finally:
            slow.release.set()
        assert download.result(timeout=30).content == data
