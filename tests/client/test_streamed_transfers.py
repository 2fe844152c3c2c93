"""Streamed pushes (one PATCH, hashed on the way) and pulls verified while written."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import httpx
import pytest

from peftreg import Client
from peftreg.digest import Digest
from peftreg.sdk.errors import DigestMismatch, TransportError
from peftreg.sdk.http import HttpSession
from peftreg.transfer.digest_memo import DigestMemo
from peftreg.transfer.progress import NullProgress
from peftreg.transfer.upload import upload_blob, upload_file
from tests.client.proxy import cutting_proxy
from tests.fixtures.server import RegistryProcess

MiB = 1024 * 1024


def _big_file(path: Path, size: int) -> Digest:
    data = os.urandom(size)
    path.write_bytes(data)
    return Digest.of_bytes(data)


def _visible(server: RegistryProcess, repository: str, digest: Digest) -> bool:
    response = httpx.head(f"{server.url}/v2/{repository}/blobs/{digest}")
    return response.status_code == 200


def _stored_blobs(server: RegistryProcess) -> set[str]:
    return {path.name for path in (server.home / "storage" / "blobs").rglob("*") if path.is_file()}


def test_a_large_file_goes_in_one_patch_hashed_on_the_way(
    server: RegistryProcess, tmp_path: Path
) -> None:
    expected = _big_file(tmp_path / "weights.bin", 24 * MiB)
    with cutting_proxy(server.port) as proxy, HttpSession(proxy.url) as http:
        digest, size, outcome = upload_file(http, "acme/stream", tmp_path / "weights.bin")
    assert (digest, size, outcome) == (expected, 24 * MiB, "uploaded")
    patches = [r for r in proxy.requests if r.startswith("PATCH ")]
    assert len(patches) == 1
    # Not hashed first: no HEAD before the upload, the digest came from the stream.
    assert not [r for r in proxy.requests if r.startswith("HEAD ")]
    assert proxy.upstream < 24 * MiB + 64 * 1024
    assert _visible(server, "acme/stream", expected)


def test_a_known_digest_the_bytes_do_not_match_is_refused_and_nothing_is_visible(
    server: RegistryProcess, tmp_path: Path
) -> None:
    path = tmp_path / "weights.bin"
    actual = _big_file(path, 20 * MiB)
    claimed = Digest.of_bytes(b"something else")
    before = _stored_blobs(server)
    with HttpSession(server.url) as http, pytest.raises(DigestMismatch) as caught:
        upload_blob(http, "acme/mismatch", claimed, 20 * MiB, path)
    assert str(actual) in str(caught.value)
    assert not _visible(server, "acme/mismatch", claimed)
    assert not _visible(server, "acme/mismatch", actual)
    assert _stored_blobs(server) == before
    assert not list((server.home / "storage" / "uploads").iterdir())


def test_an_upload_cut_without_retries_leaves_nothing_visible(
    server: RegistryProcess, tmp_path: Path
) -> None:
    path = tmp_path / "weights.bin"
    digest = _big_file(path, 32 * MiB)
    before = _stored_blobs(server)
    with (
        cutting_proxy(server.port, cut_upstream_after=10 * MiB) as proxy,
        HttpSession(proxy.url, retries=0) as http,
        pytest.raises(TransportError),
    ):
        upload_file(http, "acme/cut", path)
    assert not _visible(server, "acme/cut", digest)
    assert _stored_blobs(server) == before


def test_a_cut_push_resumes_in_a_second_patch_from_the_server_offset(
    server: RegistryProcess, tmp_path: Path
) -> None:
    path = tmp_path / "weights.bin"
    digest = _big_file(path, 40 * MiB)
    with (
        cutting_proxy(server.port, cut_upstream_after=15 * MiB) as proxy,
        HttpSession(proxy.url, retries=3, backoff=0.01) as http,
    ):
        pushed, _size, outcome = upload_file(http, "acme/resume", path)
    assert (pushed, outcome) == (digest, "uploaded")
    patches = [r for r in proxy.requests if r.startswith("PATCH ")]
    assert len(patches) == 2
    assert proxy.upstream < 40 * MiB + 2 * MiB  # the remainder only, not the file again
    with HttpSession(server.url) as http:
        body = http.request("GET", f"/v2/acme/resume/blobs/{digest}").content
    assert hashlib.sha256(body).hexdigest() == digest.hex


def test_a_remembered_digest_skips_an_unchanged_file_and_not_a_changed_one(
    server: RegistryProcess, tmp_path: Path
) -> None:
    source = tmp_path / "src"
    source.mkdir()
    first = _big_file(source / "model.bin", 20 * MiB)
    with Client(server.url, cache=tmp_path / "cache") as client:
        client.push(source, "acme/memo:v1")
    memo = DigestMemo(tmp_path / "cache" / "digests")
    assert memo.get(source / "model.bin") == first

    with cutting_proxy(server.port) as proxy, Client(proxy.url, cache=tmp_path / "cache") as c:
        again = c.push(source, "acme/memo:v2")
    assert again.skipped_blobs == 1
    assert again.uploaded_blobs == 0
    assert proxy.upstream < MiB  # HEAD and the manifest, no blob bytes

    second = _big_file(source / "model.bin", 20 * MiB)  # same size, new content
    os.utime(source / "model.bin", ns=(1, 1))
    with Client(server.url, cache=tmp_path / "cache") as client:
        changed = client.push(source, "acme/memo:v3")
    assert changed.files[0].digest == second != first
    assert changed.uploaded_blobs == 1
    assert memo.get(source / "model.bin") == second


def test_a_pull_verifies_while_writing_and_keeps_nothing_on_mismatch(
    server: RegistryProcess, tmp_path: Path
) -> None:
    source = tmp_path / "src"
    source.mkdir()
    digest = _big_file(source / "model.bin", 12 * MiB)
    with Client(server.url, cache=tmp_path / "cache") as client:
        client.push(source, "acme/verify:v1")
    stored = server.home / "storage" / "blobs" / "sha256" / digest.hex[:2] / digest.hex
    os.chmod(stored, 0o644)
    with stored.open("r+b") as handle:
        handle.seek(11 * MiB)
        handle.write(b"\0" * 16)
    with Client(server.url, cache=tmp_path / "fresh") as client, pytest.raises(DigestMismatch):
        client.pull("acme/verify:v1", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not list((tmp_path / "fresh" / "blobs" / "sha256").iterdir())


class _Shrinking(NullProgress):
    """Cuts the file to `keep` bytes once the first piece is on its way: a file a user
    overwrites while it is pushed."""

    def __init__(self, path: Path, keep: int) -> None:
        self.path = path
        self.keep = keep

    def advance(self, nbytes: int) -> None:
        if self.path.stat().st_size > self.keep:
            os.truncate(self.path, self.keep)


@pytest.mark.parametrize("via", ["sendfile", "httpx"])
def test_a_file_that_shrinks_while_pushed_fails_once_and_leaves_nothing_visible(
    server: RegistryProcess, tmp_path: Path, via: str
) -> None:
    path = tmp_path / "weights.bin"
    digest = _big_file(path, 40 * MiB)
    before = _stored_blobs(server)
    transport = httpx.HTTPTransport() if via == "httpx" else None
    with (
        cutting_proxy(server.port) as proxy,  # only counts the requests
        HttpSession(proxy.url, transport=transport, backoff=0.01) as http,
        pytest.raises(OSError, match=r"weights\.bin shrank while it was being pushed"),
    ):
        upload_file(http, "acme/shrunk", path, progress=_Shrinking(path, 20 * MiB))
    # Not taken for a broken connection: one PATCH, no retry, and no blob.
    assert len([r for r in proxy.requests if r.startswith("PATCH ")]) == 1
    assert not _visible(server, "acme/shrunk", digest)
    assert _stored_blobs(server) == before
