"""The production shape: a server on PostgreSQL and an S3 store (SeaweedFS)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.fixtures.postgres import fresh_database, postgres_admin_url
from tests.fixtures.seaweed import SeaweedS3, run_seaweed
from tests.fixtures.server import RegistryProcess, start_registry
from tests.integration.oci_helpers import (
    digest_of,
    error_codes,
    manifest_bytes,
    push_blob,
    push_manifest,
)
from tests.observability.test_metrics import parse, value

pytestmark = [pytest.mark.postgres, pytest.mark.s3]

REPO = "acme/prod-shape"
PREFIX = "registry"
MiB = 1024 * 1024


@dataclass
class Backends:
    seaweed: SeaweedS3
    bucket: str
    database_url: str

    def env(self, *, redirect: bool) -> dict[str, str]:
        return {
            "PEFTREG_DATABASE_URL": self.database_url,
            "PEFTREG_AUTO_MIGRATE": "true",
            "PEFTREG_STORAGE": "s3",
            "PEFTREG_S3_ENDPOINT_URL": self.seaweed.endpoint_url,
            "PEFTREG_S3_BUCKET": self.bucket,
            "PEFTREG_S3_PREFIX": PREFIX,
            "PEFTREG_S3_REGION": self.seaweed.region,
            "PEFTREG_S3_ACCESS_KEY_ID": self.seaweed.access_key_id,
            "PEFTREG_S3_SECRET_ACCESS_KEY": self.seaweed.secret_access_key,
            "PEFTREG_S3_REDIRECT": "true" if redirect else "false",
        }

    def blob_keys(self) -> list[str]:
        client = self.seaweed.client()
        keys = []
        for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=f"{PREFIX}/blobs/"
        ):
            keys += [item["Key"] for item in page.get("Contents", [])]
        return sorted(keys)


@pytest.fixture(scope="module")
def seaweed() -> Iterator[SeaweedS3]:
    with run_seaweed() as server:
        yield server


@pytest.fixture
def backends(seaweed: SeaweedS3) -> Iterator[Backends]:
    bucket = seaweed.create_bucket()
    try:
        with fresh_database(postgres_admin_url()) as url:
            yield Backends(seaweed, bucket, url)
    finally:
        seaweed.delete_bucket(bucket)


def start(backends: Backends, home: Path, *, redirect: bool) -> RegistryProcess:
    return start_registry(home, backends.env(redirect=redirect))


def push_in_chunks(client: httpx.Client, data: bytes, chunk: int) -> httpx.Response:
    started = client.post(f"/v2/{REPO}/blobs/uploads/")
    assert started.status_code == 202, started.text
    location = started.headers["Location"]
    for offset in range(0, len(data), chunk):
        part = data[offset : offset + chunk]
        response = client.patch(
            location,
            content=part,
            headers={"Content-Range": f"{offset}-{offset + len(part) - 1}"},
        )
        assert response.status_code == 202, response.text
        location = response.headers["Location"]
    return client.put(location, params={"digest": digest_of(data)})


def test_push_pull_and_digest_mismatch_on_postgres_and_s3(
    backends: Backends, tmp_path: Path
) -> None:
    layer = os.urandom(21 * MiB)  # several S3 chunk objects and multipart parts
    config = b'{"name":"prod-shape","rank":16}'
    server = start(backends, tmp_path / "home", redirect=False)
    try:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            pushed = push_in_chunks(client, layer, 5 * MiB + 123)
            assert pushed.status_code == 201, pushed.text
            assert push_blob(client, REPO, config).status_code == 201
            manifest = manifest_bytes(config, [(digest_of(layer), len(layer))])
            response = push_manifest(client, REPO, "prod", manifest)
            assert response.status_code == 201, response.text

            pulled = client.get(f"/v2/{REPO}/manifests/prod")
            assert pulled.content == manifest
            blob = client.get(f"/v2/{REPO}/blobs/{digest_of(layer)}")
            assert blob.status_code == 200
            assert hashlib.sha256(blob.content).digest() == hashlib.sha256(layer).digest()
            ranged = client.get(
                f"/v2/{REPO}/blobs/{digest_of(layer)}", headers={"Range": "bytes=100-8388707"}
            )
            assert ranged.status_code == 206
            assert ranged.content == layer[100:8388708]
            versions = client.get(f"/api/v1/repositories/{REPO}/versions").json()["items"]
            assert [(v["digest"], v["tags"]) for v in versions] == [(digest_of(manifest), ["prod"])]
            keys_before = backends.blob_keys()
            assert len(keys_before) == 2

            # Digest mismatch, monolithic and chunked: refused, nothing visible.
            claimed = digest_of(b"something else")
            monolithic = client.post(
                f"/v2/{REPO}/blobs/uploads/", params={"digest": claimed}, content=b"x" * MiB
            )
            assert monolithic.status_code == 400
            assert error_codes(monolithic) == ["DIGEST_INVALID"]
            started = client.post(f"/v2/{REPO}/blobs/uploads/")
            patched = client.patch(started.headers["Location"], content=b"y" * (3 * MiB))
            assert patched.status_code == 202
            finished = client.put(patched.headers["Location"], params={"digest": claimed})
            assert finished.status_code == 400
            assert error_codes(finished) == ["DIGEST_INVALID"]
            for wrong in (claimed, digest_of(b"x" * MiB), digest_of(b"y" * (3 * MiB))):
                assert client.head(f"/v2/{REPO}/blobs/{wrong}").status_code == 404
            assert backends.blob_keys() == keys_before
    finally:
        server.stop()


def test_a_blob_sent_whole_with_its_digest_is_written_once_to_its_key(
    backends: Backends, tmp_path: Path
) -> None:
    """A monolithic POST, or a PUT that closes an empty session with the whole blob (as
    oras pushes), goes to the blob's key in parts: no session segment, no copy."""
    layer, other = os.urandom(9 * MiB + 5), os.urandom(2 * MiB)
    client_s3 = backends.seaweed.client()
    server = start(backends, tmp_path / "home", redirect=False)
    try:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            started = client.post(f"/v2/{REPO}/blobs/uploads/")
            location = started.headers["Location"]
            finished = client.put(location, params={"digest": digest_of(layer)}, content=layer)
            assert finished.status_code == 201, finished.text
            assert finished.headers["Docker-Content-Digest"] == digest_of(layer)
            assert client.get(location).status_code == 404  # the session is closed
            assert push_blob(client, REPO, other).status_code == 201
            for blob in (layer, other):
                fetched = client.get(f"/v2/{REPO}/blobs/{digest_of(blob)}")
                assert hashlib.sha256(fetched.content).digest() == hashlib.sha256(blob).digest()

            listed = client_s3.list_objects_v2(Bucket=backends.bucket)
            keys = sorted(item["Key"] for item in listed["Contents"])
            assert keys == backends.blob_keys()  # nothing under uploads/
            assert len(keys) == 2
            # Published by the blob writer; no session was committed (a copy on S3).
            samples = parse(client.get("/metrics").text)
            calls = "blob_store_seconds_count"
            assert value(samples, calls, backend="s3", operation="publish") == 2
            assert value(samples, calls, backend="s3", operation="commit_upload") == 0

            # Whole bytes that do not match: refused, and no unfinished upload is left.
            retry = client.post(f"/v2/{REPO}/blobs/uploads/").headers["Location"]
            wrong = client.put(retry, params={"digest": digest_of(b"else")}, content=layer)
            assert wrong.status_code == 400
            assert error_codes(wrong) == ["DIGEST_INVALID"]
            assert client.head(f"/v2/{REPO}/blobs/{digest_of(b'else')}").status_code == 404
            uploads = client_s3.list_multipart_uploads(Bucket=backends.bucket)
            assert uploads.get("Uploads", []) == []
            assert backends.blob_keys() == keys
    finally:
        server.stop()


def test_blob_get_redirects_to_a_presigned_url(backends: Backends, tmp_path: Path) -> None:
    layer = os.urandom(3 * MiB + 17)
    server = start(backends, tmp_path / "home", redirect=True)
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            assert push_blob(client, REPO, layer).status_code == 201
            path = f"/v2/{REPO}/blobs/{digest_of(layer)}"

            redirect = client.get(path)
            assert redirect.status_code == 307
            location = redirect.headers["Location"]
            assert location.startswith(backends.seaweed.endpoint_url)
            assert "Signature" in location
            assert redirect.headers["Docker-Content-Digest"] == digest_of(layer)

            followed = client.get(path, follow_redirects=True)
            assert followed.status_code == 200
            assert followed.content == layer
            assert len(followed.history) == 1

            head = client.head(path)
            assert head.status_code == 200
            assert head.headers["Content-Length"] == str(len(layer))
    finally:
        server.stop()
