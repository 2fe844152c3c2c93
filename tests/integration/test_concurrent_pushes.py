"""32 concurrent pushes of overlapping content, on SQLite and on PostgreSQL.

Every artifact shares three layer blobs with all the others and has one
layer and a config of its own; the pushes go to four repositories, eight
each. All must succeed; afterwards every distinct blob is stored exactly
once, no upload session is left behind, and every tag names its manifest.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.fixtures.postgres import fresh_database, postgres_admin_url
from tests.fixtures.server import RegistryProcess, start_registry
from tests.integration.oci_helpers import (
    Artifact,
    digest_of,
    make_artifact,
    push_blob,
    push_manifest,
)

PUSHERS = 32
REPOSITORIES = 4
SHARED = [hashlib.sha256(f"shared-{i}".encode()).digest() * (32 * 1024) for i in range(3)]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RegistryProcess]:
    home = tmp_path / "home"
    if request.param == "sqlite":
        process = start_registry(home)
        yield process
        process.stop()
        return
    with fresh_database(postgres_admin_url()) as url:
        process = start_registry(
            home, {"PEFTREG_DATABASE_URL": url, "PEFTREG_AUTO_MIGRATE": "true"}
        )
        yield process
        process.stop()


def artifact_for(index: int) -> tuple[str, str, Artifact]:
    unique = f"unique layer of pusher {index}".encode() * 1000
    artifact = make_artifact(*SHARED, unique, name=f"pusher-{index}")
    return f"team{index % REPOSITORIES}/model", f"t{index}", artifact


def test_concurrent_overlapping_pushes(server: RegistryProcess) -> None:
    barrier = threading.Barrier(PUSHERS)
    plan = [artifact_for(index) for index in range(PUSHERS)]

    def push(index: int) -> str:
        repository, tag, artifact = plan[index]
        with httpx.Client(base_url=server.url, timeout=60) as client:
            barrier.wait(timeout=60)
            # No HEAD first: every pusher uploads every blob, so the shared
            # ones really are committed concurrently.
            for blob in artifact.blobs:
                response = push_blob(client, repository, blob)
                assert response.status_code == 201, response.text
            response = push_manifest(client, repository, tag, artifact.manifest)
            assert response.status_code == 201, response.text
            return response.headers["Docker-Content-Digest"]

    with ThreadPoolExecutor(max_workers=PUSHERS) as pool:
        digests = list(pool.map(push, range(PUSHERS)))
    assert digests == [artifact.manifest_digest for _, _, artifact in plan]

    storage = server.home / "storage"
    stored = sorted(path.name for path in (storage / "blobs").rglob("*") if path.is_file())
    expected = sorted(
        {digest_of(blob).removeprefix("sha256:") for _, _, a in plan for blob in a.blobs}
    )
    assert len(expected) == 3 + 2 * PUSHERS
    assert stored == expected, "every distinct blob is stored exactly once"
    assert list((storage / "uploads").iterdir()) == [], "no upload session left behind"

    with httpx.Client(base_url=server.url, timeout=60) as client:
        for repository, tag, artifact in plan:
            response = client.get(f"/v2/{repository}/manifests/{tag}")
            assert response.status_code == 200, response.text
            assert response.headers["Docker-Content-Digest"] == artifact.manifest_digest
            assert response.content == artifact.manifest
            for blob in (SHARED[0], artifact.layers[-1]):
                head = client.head(f"/v2/{repository}/blobs/{digest_of(blob)}")
                assert head.status_code == 200
        for index in range(REPOSITORIES):
            listed = client.get(f"/v2/team{index}/model/tags/list").json()["tags"]
            assert sorted(listed) == sorted(
                tag for repository, tag, _ in plan if repository == f"team{index}/model"
            )
