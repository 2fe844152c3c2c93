"""A server killed (SIGKILL) in the middle of a large upload leaves nothing visible.

The upload streams from a generator that parks after a while, so the kill
lands while the request body is still arriving; the test waits for the
server to report a non-zero offset for the session (a readiness condition,
not a sleep) before it kills the process group.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx

from tests.fixtures.server import RegistryProcess, start_registry
from tests.integration.oci_helpers import (
    manifest_bytes,
    push_blob,
    push_blob_chunked,
    push_manifest,
)

REPO = "acme/crash"
CHUNK = 1024 * 1024
CHUNKS = 100  # 100 MiB
SENT_BEFORE_PARKING = 24  # MiB streamed before the generator waits for the kill
DEADLINE = 30.0


def blob_chunks() -> list[bytes]:
    return [os.urandom(CHUNK) for _ in range(CHUNKS)]


def stored_files(home: Path, hex_digest: str) -> list[Path]:
    return [path for path in (home / "storage" / "blobs").rglob("*") if hex_digest in path.name]


def upload_offset(client: httpx.Client, location: str) -> int:
    response = client.get(location)
    assert response.status_code == 204, response.text
    end = int(response.headers["Range"].split("-")[1])
    return end + 1 if end > 0 else 0


def test_killed_mid_upload_leaves_nothing_and_push_succeeds_after_restart(
    tmp_path: Path,
) -> None:
    home = tmp_path / "home"
    chunks = blob_chunks()
    hasher = hashlib.sha256()
    for chunk in chunks:
        hasher.update(chunk)
    digest = f"sha256:{hasher.hexdigest()}"
    size = CHUNK * CHUNKS

    server = start_registry(home)
    killed = threading.Event()
    outcome: list[BaseException | httpx.Response] = []
    try:
        with httpx.Client(base_url=server.url, timeout=DEADLINE) as client:
            started = client.post(f"/v2/{REPO}/blobs/uploads/")
            assert started.status_code == 202, started.text
            location = httpx.URL(started.headers["Location"]).path

            def body() -> Iterator[bytes]:
                for index, chunk in enumerate(chunks):
                    if index == SENT_BEFORE_PARKING:
                        killed.wait(DEADLINE)
                    yield chunk

            def stream() -> None:
                try:
                    with httpx.Client(base_url=server.url, timeout=DEADLINE) as uploader:
                        outcome.append(uploader.patch(location, content=body()))
                except BaseException as exc:  # the server dies under us: expected
                    outcome.append(exc)

            thread = threading.Thread(target=stream, daemon=True)
            thread.start()
            deadline = threading.Event()
            timer = threading.Timer(DEADLINE, deadline.set)
            timer.start()
            try:
                while upload_offset(client, location) == 0:
                    assert not deadline.is_set(), "the server never reported received bytes"
                    assert thread.is_alive(), f"upload ended early: {outcome}"
            finally:
                timer.cancel()
            received = upload_offset(client, location)
            assert 0 < received < size
        server.kill()
    finally:
        killed.set()
        server.stop()
    thread.join(DEADLINE)
    assert not thread.is_alive()
    assert len(outcome) == 1
    assert not isinstance(outcome[0], httpx.Response), "the interrupted PATCH cannot succeed"

    restarted = RegistryProcess(home=home, env=server.env).start()
    try:
        with httpx.Client(base_url=restarted.url, timeout=DEADLINE) as client:
            assert client.head(f"/v2/{REPO}/blobs/{digest}").status_code == 404
            assert stored_files(home, hasher.hexdigest()) == []
            assert client.get(f"/v2/{REPO}/manifests/latest").status_code == 404
            versions = client.get(f"/api/v1/repositories/{REPO}/versions")
            assert versions.status_code in (200, 404), versions.text
            if versions.status_code == 200:
                assert versions.json()["items"] == []

            # The whole push, repeated, now succeeds and pulls back byte-identically.
            pushed = push_blob_chunked(client, REPO, iter(chunks), digest)
            assert pushed.status_code == 201, pushed.text
            config = b'{"name":"crash","rank":8}'
            assert push_blob(client, REPO, config).status_code == 201
            artifact = manifest_bytes(config, [(digest, size)])
            response = push_manifest(client, REPO, "latest", artifact)
            assert response.status_code == 201, response.text

            manifest = client.get(f"/v2/{REPO}/manifests/latest")
            assert manifest.status_code == 200
            assert manifest.content == artifact
            pulled = hashlib.sha256()
            length = 0
            with client.stream("GET", f"/v2/{REPO}/blobs/{digest}") as blob:
                assert blob.status_code == 200
                for part in blob.iter_bytes():
                    pulled.update(part)
                    length += len(part)
            assert (length, pulled.hexdigest()) == (size, hasher.hexdigest())
            assert len(stored_files(home, hasher.hexdigest())) == 1
            items = client.get(f"/api/v1/repositories/{REPO}/versions").json()["items"]
            assert [item["tags"] for item in items] == [["latest"]]
    finally:
        restarted.stop()
