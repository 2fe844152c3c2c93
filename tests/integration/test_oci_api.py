"""OCI Distribution v1.1 behaviour of a real `peftreg serve` process, over HTTP.

The helpers at the top are shared with `test_management_api.py`.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from tests.conftest import ADMIN_TOKEN
from tests.fixtures.server import RegistryProcess

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
EMPTY_JSON = "application/vnd.oci.empty.v1+json"
LAYER_TYPE = "application/vnd.peftreg.adapter.weights.v1"

T = TypeVar("T")


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def push_blob(client: httpx.Client, repo: str, data: bytes) -> str:
    """Monolithic upload (`POST ?digest=`); returns the digest."""
    digest = sha256(data)
    response = client.post(f"/v2/{repo}/blobs/uploads/", params={"digest": digest}, content=data)
    assert response.status_code == 201, response.text
    assert response.headers["Docker-Content-Digest"] == digest
    return digest


def manifest_bytes(
    client: httpx.Client,
    repo: str,
    *,
    layers: list[bytes] | None = None,
    config: bytes = b"{}",
    config_type: str = EMPTY_JSON,
    artifact_type: str | None = "application/vnd.example.artifact.v1",
    annotations: dict[str, str] | None = None,
    subject: dict[str, Any] | None = None,
) -> bytes:
    """Push the blobs of a manifest and return the manifest's bytes (not pushed yet)."""
    config_digest = push_blob(client, repo, config)
    layer_descriptors = [
        {"mediaType": LAYER_TYPE, "digest": push_blob(client, repo, data), "size": len(data)}
        for data in (layers if layers is not None else [b"layer-bytes"])
    ]
    document: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": config_type, "digest": config_digest, "size": len(config)},
        "layers": layer_descriptors,
    }
    if artifact_type is not None:
        document["artifactType"] = artifact_type
    if annotations:
        document["annotations"] = annotations
    if subject is not None:
        document["subject"] = subject
    return json.dumps(document, sort_keys=True).encode()


def put_manifest(client: httpx.Client, repo: str, reference: str, content: bytes) -> httpx.Response:
    return client.put(
        f"/v2/{repo}/manifests/{reference}",
        content=content,
        headers={"Content-Type": OCI_MANIFEST},
    )


def push_manifest(client: httpx.Client, repo: str, reference: str, **kwargs: Any) -> str:
    """Push blobs and a manifest; returns the manifest digest."""
    content = manifest_bytes(client, repo, **kwargs)
    response = put_manifest(client, repo, reference, content)
    assert response.status_code == 201, response.text
    assert response.headers["Docker-Content-Digest"] == sha256(content)
    return sha256(content)


def assert_oci_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The OCI error shape with the expected code, and a request id header."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers.get("X-Request-Id")
    body = response.json()
    assert isinstance(body["errors"], list), body
    assert body["errors"], body
    first = body["errors"][0]
    assert first["code"] == code, body
    assert isinstance(first["message"], str)
    assert first["message"]
    return dict(first)


def wait_until(condition: Callable[[], T | None], deadline_s: float = 15.0) -> T:
    """Poll `condition` until it returns a truthy value or the deadline passes.

    A readiness condition with a deadline: the loop ends as soon as the
    observed state is reached, not after a fixed delay.
    """
    deadline = time.monotonic() + deadline_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not reached within {deadline_s}s")
        time.sleep(0.02)  # back-off between polls of the observed state


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def client(registry_server: RegistryProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=registry_server.url, timeout=60) as http:
        yield http


def stored_files(server: RegistryProcess, area: str) -> list[Path]:
    root = server.home / "storage" / area
    return [path for path in root.rglob("*") if path.is_file()] if root.exists() else []


# --------------------------------------------------------------------------- base


def test_ping_answers_with_api_version(client: httpx.Client) -> None:
    response = client.get("/v2/")
    assert response.status_code == 200
    assert response.headers["Docker-Distribution-API-Version"] == "registry/2.0"
    assert response.headers.get("X-Request-Id")


def test_ping_on_secured_server_challenges_anonymous(secured_server: RegistryProcess) -> None:
    anonymous = httpx.get(f"{secured_server.url}/v2/")
    assert_oci_error(anonymous, 401, "UNAUTHORIZED")
    assert anonymous.headers["WWW-Authenticate"].startswith("Bearer realm=")
    admin = httpx.get(
        f"{secured_server.url}/v2/", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
    )
    assert admin.status_code == 200


# --------------------------------------------------------------------------- blobs


def test_monolithic_upload_then_head_and_get(client: httpx.Client) -> None:
    data = os.urandom(300_000)
    digest = push_blob(client, "acme/mono", data)

    head = client.head(f"/v2/acme/mono/blobs/{digest}")
    assert head.status_code == 200
    assert head.headers["Docker-Content-Digest"] == digest
    assert int(head.headers["Content-Length"]) == len(data)
    assert head.content == b""

    got = client.get(f"/v2/acme/mono/blobs/{digest}")
    assert got.status_code == 200
    assert got.headers["Docker-Content-Digest"] == digest
    assert got.content == data


def test_chunked_upload_reports_progress_and_is_byte_identical(client: httpx.Client) -> None:
    data = os.urandom(3 * 1024 * 1024 + 123)
    parts = [data[:1_000_000], data[1_000_000:2_500_000], data[2_500_000:]]
    digest = sha256(data)

    started = client.post("/v2/acme/chunked/blobs/uploads/")
    assert started.status_code == 202
    location = started.headers["Location"]
    assert location.startswith("/v2/acme/chunked/blobs/uploads/")
    assert started.headers["Docker-Upload-UUID"] in location

    offset = 0
    for part in parts[:2]:
        end = offset + len(part) - 1
        patched = client.patch(
            location,
            content=part,
            headers={
                "Content-Type": "application/octet-stream",
                "Content-Range": f"{offset}-{end}",
            },
        )
        assert patched.status_code == 202, patched.text
        assert patched.headers["Range"] == f"0-{end}"
        location = patched.headers["Location"]
        offset = end + 1

        status = client.get(location)
        assert status.status_code == 204
        assert status.headers["Range"] == f"0-{end}"

    # the last chunk travels with the closing PUT
    finished = client.put(
        location,
        params={"digest": digest},
        content=parts[2],
        headers={"Content-Type": "application/octet-stream"},
    )
    assert finished.status_code == 201, finished.text
    assert finished.headers["Docker-Content-Digest"] == digest
    assert finished.headers["Location"] == f"/v2/acme/chunked/blobs/{digest}"

    got = client.get(f"/v2/acme/chunked/blobs/{digest}")
    assert got.content == data

    # the session is gone once committed
    assert_oci_error(client.get(location), 404, "BLOB_UPLOAD_UNKNOWN")


def test_range_get_returns_partial_content(client: httpx.Client) -> None:
    data = bytes(range(256)) * 40
    digest = push_blob(client, "acme/ranges", data)
    url = f"/v2/acme/ranges/blobs/{digest}"

    partial = client.get(url, headers={"Range": "bytes=10-19"})
    assert partial.status_code == 206
    assert partial.headers["Content-Range"] == f"bytes 10-19/{len(data)}"
    assert partial.content == data[10:20]

    suffix = client.get(url, headers={"Range": "bytes=-5"})
    assert suffix.status_code == 206
    assert suffix.headers["Content-Range"] == f"bytes {len(data) - 5}-{len(data) - 1}/{len(data)}"
    assert suffix.content == data[-5:]

    open_ended = client.get(url, headers={"Range": f"bytes={len(data) - 3}-"})
    assert open_ended.status_code == 206
    assert open_ended.content == data[-3:]

    outside = client.get(url, headers={"Range": f"bytes={len(data)}-"})
    assert_oci_error(outside, 416, "RANGE_INVALID")


def test_digest_mismatch_stores_nothing(
    client: httpx.Client, registry_server: RegistryProcess
) -> None:
    data = b"the bytes actually sent" * 1000
    claimed = sha256(b"something else entirely")

    response = client.post(
        "/v2/acme/mismatch/blobs/uploads/", params={"digest": claimed}, content=data
    )
    error = assert_oci_error(response, 400, "DIGEST_INVALID")
    assert error["detail"]["actual"] == sha256(data)

    for digest in (claimed, sha256(data)):
        assert client.head(f"/v2/acme/mismatch/blobs/{digest}").status_code == 404
    assert stored_files(registry_server, "blobs") == []
    assert stored_files(registry_server, "uploads") == []

    # the same through a session: the PUT is refused and nothing appears
    started = client.post("/v2/acme/mismatch/blobs/uploads/")
    location = started.headers["Location"]
    patched = client.patch(location, content=data)
    assert patched.status_code == 202
    finished = client.put(patched.headers["Location"], params={"digest": claimed})
    assert_oci_error(finished, 400, "DIGEST_INVALID")
    assert client.head(f"/v2/acme/mismatch/blobs/{sha256(data)}").status_code == 404
    assert stored_files(registry_server, "blobs") == []


def test_a_whole_blob_put_that_does_not_match_leaves_the_session_empty_and_usable(
    client: httpx.Client, registry_server: RegistryProcess
) -> None:
    """The whole blob in the closing PUT (as oras sends it): a mismatch stores nothing,
    and the same session then takes the right bytes."""
    data = b"the whole blob in one PUT" * 1000
    location = client.post("/v2/acme/whole-put/blobs/uploads/").headers["Location"]

    wrong = client.put(location, params={"digest": sha256(b"else")}, content=data)

    error = assert_oci_error(wrong, 400, "DIGEST_INVALID")
    assert error["detail"]["actual"] == sha256(data)
    assert stored_files(registry_server, "blobs") == []
    status = client.get(location)
    assert status.status_code == 204
    assert status.headers["Range"] == "0-0"  # still open, still empty
    finished = client.put(location, params={"digest": sha256(data)}, content=data)
    assert finished.status_code == 201, finished.text
    assert client.get(f"/v2/acme/whole-put/blobs/{sha256(data)}").content == data
    assert stored_files(registry_server, "uploads") == []


def test_malformed_digest_is_digest_invalid(client: httpx.Client) -> None:
    response = client.post(
        "/v2/acme/baddigest/blobs/uploads/", params={"digest": "sha256:nothex"}, content=b"x"
    )
    assert_oci_error(response, 400, "DIGEST_INVALID")


def test_patch_at_wrong_offset_is_416_and_session_survives(client: httpx.Client) -> None:
    data = os.urandom(200)
    started = client.post("/v2/acme/offsets/blobs/uploads/")
    location = started.headers["Location"]
    first = client.patch(location, content=data[:100], headers={"Content-Range": "0-99"})
    assert first.status_code == 202
    assert first.headers["Range"] == "0-99"

    for bad in ("50-149", "101-200", "0-99"):
        refused = client.patch(location, content=data[100:], headers={"Content-Range": bad})
        assert_oci_error(refused, 416, "RANGE_INVALID")

    status = client.get(location)
    assert status.status_code == 204
    assert status.headers["Range"] == "0-99"

    second = client.patch(location, content=data[100:], headers={"Content-Range": "100-199"})
    assert second.status_code == 202
    assert second.headers["Range"] == "0-199"
    finished = client.put(location, params={"digest": sha256(data)})
    assert finished.status_code == 201, finished.text
    assert client.get(f"/v2/acme/offsets/blobs/{sha256(data)}").content == data


def test_unknown_upload_session(client: httpx.Client) -> None:
    client.post("/v2/acme/sessions/blobs/uploads/")  # creates the repository
    missing = "/v2/acme/sessions/blobs/uploads/00000000-0000-4000-8000-000000000000"
    assert_oci_error(client.get(missing), 404, "BLOB_UPLOAD_UNKNOWN")
    assert_oci_error(client.patch(missing, content=b"x"), 404, "BLOB_UPLOAD_UNKNOWN")


def test_cancelled_upload_session_is_gone(
    client: httpx.Client, registry_server: RegistryProcess
) -> None:
    started = client.post("/v2/acme/cancel/blobs/uploads/")
    location = started.headers["Location"]
    assert client.patch(location, content=b"partial").status_code == 202
    assert client.delete(location).status_code == 204
    assert_oci_error(client.get(location), 404, "BLOB_UPLOAD_UNKNOWN")
    assert stored_files(registry_server, "uploads") == []


def test_client_disconnect_mid_upload_leaves_no_blob(
    client: httpx.Client, registry_server: RegistryProcess
) -> None:
    data = os.urandom(8 * 1024 * 1024)
    digest = sha256(data)
    head_url = f"/v2/acme/disconnect/blobs/{digest}"
    request = (
        f"POST /v2/acme/disconnect/blobs/uploads/?digest={digest} HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{registry_server.port}\r\n"
        "Content-Type: application/octet-stream\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", registry_server.port), timeout=30) as sock:
        sock.sendall(request + data[: len(data) // 2])
        # the server has opened a session and is writing into it
        wait_until(lambda: stored_files(registry_server, "uploads"))
    # the socket is closed: the server must cancel that session
    wait_until(lambda: stored_files(registry_server, "uploads") == [] or None)

    assert client.head(head_url).status_code == 404
    assert stored_files(registry_server, "blobs") == []

    digest_again = push_blob(client, "acme/disconnect", data)
    assert digest_again == digest
    assert client.get(head_url).content == data


# --------------------------------------------------------------------------- mounts


def test_cross_repository_mount(client: httpx.Client) -> None:
    data = os.urandom(5000)
    digest = push_blob(client, "acme/source", data)
    client.post("/v2/acme/target/blobs/uploads/")  # target exists but lacks the blob
    assert client.head(f"/v2/acme/target/blobs/{digest}").status_code == 404

    mounted = client.post(
        "/v2/acme/target/blobs/uploads/", params={"mount": digest, "from": "acme/source"}
    )
    assert mounted.status_code == 201, mounted.text
    assert mounted.headers["Docker-Content-Digest"] == digest
    assert mounted.headers["Location"] == f"/v2/acme/target/blobs/{digest}"
    assert client.get(f"/v2/acme/target/blobs/{digest}").content == data


def test_mount_from_repository_without_blob_starts_a_session(client: httpx.Client) -> None:
    data = os.urandom(4000)
    digest = sha256(data)
    push_blob(client, "acme/empty-source", b"some other blob")

    for source in ("acme/empty-source", "acme/does-not-exist"):
        response = client.post(
            "/v2/acme/mount-target/blobs/uploads/", params={"mount": digest, "from": source}
        )
        assert response.status_code == 202, response.text
        location = response.headers["Location"]
        assert location.startswith("/v2/acme/mount-target/blobs/uploads/")
    assert client.head(f"/v2/acme/mount-target/blobs/{digest}").status_code == 404

    finished = client.put(location, params={"digest": digest}, content=data)
    assert finished.status_code == 201
    assert client.get(f"/v2/acme/mount-target/blobs/{digest}").content == data


# --------------------------------------------------------------------------- manifests


def test_manifest_put_and_get_by_tag_and_digest(client: httpx.Client) -> None:
    content = manifest_bytes(client, "acme/manifests", layers=[b"weights"])
    digest = sha256(content)

    by_tag = put_manifest(client, "acme/manifests", "latest", content)
    assert by_tag.status_code == 201
    assert by_tag.headers["Docker-Content-Digest"] == digest
    assert by_tag.headers["Location"] == f"/v2/acme/manifests/manifests/{digest}"

    other = manifest_bytes(client, "acme/manifests", layers=[b"other weights"])
    by_digest = put_manifest(client, "acme/manifests", sha256(other), other)
    assert by_digest.status_code == 201
    assert by_digest.headers["Docker-Content-Digest"] == sha256(other)

    for reference, expected in (("latest", content), (digest, content), (sha256(other), other)):
        got = client.get(
            f"/v2/acme/manifests/manifests/{reference}", headers={"Accept": OCI_MANIFEST}
        )
        assert got.status_code == 200
        assert got.content == expected
        assert got.headers["Content-Type"] == OCI_MANIFEST
        assert got.headers["Docker-Content-Digest"] == sha256(expected)

        head = client.head(f"/v2/acme/manifests/manifests/{reference}")
        assert head.status_code == 200
        assert head.content == b""
        assert head.headers["Content-Type"] == OCI_MANIFEST
        assert head.headers["Docker-Content-Digest"] == sha256(expected)
        assert int(head.headers["Content-Length"]) == len(expected)

    assert_oci_error(client.get("/v2/acme/manifests/manifests/nope"), 404, "MANIFEST_UNKNOWN")
    assert client.head("/v2/acme/manifests/manifests/nope").status_code == 404


def test_manifest_put_by_wrong_digest_is_refused(client: httpx.Client) -> None:
    content = manifest_bytes(client, "acme/wrongdigest")
    response = put_manifest(client, "acme/wrongdigest", sha256(b"not it"), content)
    assert_oci_error(response, 400, "DIGEST_INVALID")
    assert client.head(f"/v2/acme/wrongdigest/manifests/{sha256(content)}").status_code == 404


def test_manifest_naming_missing_blob_is_refused(client: httpx.Client) -> None:
    config = push_blob(client, "acme/missing", b"{}")
    missing = sha256(b"never uploaded")
    document = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": EMPTY_JSON, "digest": config, "size": 2},
        "layers": [{"mediaType": LAYER_TYPE, "digest": missing, "size": 14}],
    }
    content = json.dumps(document).encode()
    error = assert_oci_error(
        put_manifest(client, "acme/missing", "latest", content), 400, "MANIFEST_BLOB_UNKNOWN"
    )
    assert missing in json.dumps(error)
    assert client.head("/v2/acme/missing/manifests/latest").status_code == 404


def test_blob_in_another_repository_does_not_satisfy_a_manifest(client: httpx.Client) -> None:
    layer = push_blob(client, "acme/elsewhere", b"layer only here")
    config = push_blob(client, "acme/here", b"{}")
    document = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": EMPTY_JSON, "digest": config, "size": 2},
        "layers": [{"mediaType": LAYER_TYPE, "digest": layer, "size": 15}],
    }
    response = put_manifest(client, "acme/here", "latest", json.dumps(document).encode())
    assert_oci_error(response, 400, "MANIFEST_BLOB_UNKNOWN")


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"[]", b'{"schemaVersion": 2, "mediaType": "' + OCI_MANIFEST.encode() + b'"}'],
    ids=["not-json", "not-object", "no-config"],
)
def test_invalid_manifest_is_manifest_invalid(client: httpx.Client, content: bytes) -> None:
    response = put_manifest(client, "acme/invalid", "latest", content)
    assert_oci_error(response, 400, "MANIFEST_INVALID")


def test_manifest_over_limit_is_413_and_just_under_is_accepted(client: httpx.Client) -> None:
    limit = 4 * 1024 * 1024
    base = json.loads(manifest_bytes(client, "acme/big"))

    def with_annotation(size: int) -> bytes:
        document = {**base, "annotations": {"padding": ""}}
        overhead = len(json.dumps(document, sort_keys=True).encode())
        document["annotations"]["padding"] = "x" * (size - overhead)
        content = json.dumps(document, sort_keys=True).encode()
        assert len(content) == size
        return content

    too_big = with_annotation(limit + 1)
    error = assert_oci_error(
        put_manifest(client, "acme/big", "huge", too_big), 413, "MANIFEST_TOO_LARGE"
    )
    assert error["detail"]["limit"] == limit

    # without Content-Length (chunked transfer) the limit still holds
    streamed = client.put(
        "/v2/acme/big/manifests/huge",
        content=iter([too_big[:1_000_000], too_big[1_000_000:]]),
        headers={"Content-Type": OCI_MANIFEST},
    )
    assert_oci_error(streamed, 413, "MANIFEST_TOO_LARGE")
    assert client.head("/v2/acme/big/manifests/huge").status_code == 404

    fits = with_annotation(int(3.9 * 1024 * 1024))
    accepted = put_manifest(client, "acme/big", "large", fits)
    assert accepted.status_code == 201, accepted.text
    assert client.get("/v2/acme/big/manifests/large").content == fits


# httpx removes dot segments, so a literal `/v2/../x/...` never leaves it as
# written; `%2E%2E` reaches the server, which decodes it to `..`. A literal
# `..` is also sent with http.client below, which leaves the path alone.
INVALID_NAME_PATHS = [
    "/v2/%2E%2E/x/manifests/latest",
    "/v2/A/B/manifests/latest",
    "/v2/a//b/manifests/latest",
    "/v2/a/b//manifests/latest",  # the name `a/b/` with its trailing slash
    "/v2/-a/b/tags/list",
]


@pytest.mark.parametrize("path", INVALID_NAME_PATHS)
def test_invalid_repository_names(client: httpx.Client, path: str) -> None:
    assert_oci_error(client.get(path), 400, "NAME_INVALID")
    if "/manifests/" in path:
        refused = client.put(path, content=b"{}", headers={"Content-Type": OCI_MANIFEST})
        assert_oci_error(refused, 400, "NAME_INVALID")
        upload = path.split("/manifests/", maxsplit=1)[0] + "/blobs/uploads/"
        assert_oci_error(client.post(upload), 400, "NAME_INVALID")


def test_literal_dot_dot_repository_name(registry_server: RegistryProcess) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", registry_server.port, timeout=30)
    try:
        connection.request("POST", "/v2/../x/blobs/uploads/")
        response = connection.getresponse()
        body = json.loads(response.read())
    finally:
        connection.close()
    assert response.status == 400
    assert body["errors"][0]["code"] == "NAME_INVALID"
    assert response.getheader("X-Request-Id")


def test_immutable_release_tag_and_movable_channel(client: httpx.Client) -> None:
    first = manifest_bytes(client, "acme/tags", layers=[b"first"])
    second = manifest_bytes(client, "acme/tags", layers=[b"second"])

    assert put_manifest(client, "acme/tags", "v1", first).status_code == 201
    error = assert_oci_error(put_manifest(client, "acme/tags", "v1", second), 409, "TAG_IMMUTABLE")
    assert error["detail"]["current"] == sha256(first)
    still = client.head("/v2/acme/tags/manifests/v1")
    assert still.headers["Docker-Content-Digest"] == sha256(first)
    # the refused manifest was not stored either: the transaction rolled back
    assert client.head(f"/v2/acme/tags/manifests/{sha256(second)}").status_code == 404

    again = put_manifest(client, "acme/tags", "v1", first)
    assert again.status_code == 201
    assert again.headers["Docker-Content-Digest"] == sha256(first)

    assert put_manifest(client, "acme/tags", "prod", first).status_code == 201
    assert put_manifest(client, "acme/tags", "prod", second).status_code == 201
    moved = client.get("/v2/acme/tags/manifests/prod")
    assert moved.headers["Docker-Content-Digest"] == sha256(second)
    assert moved.content == second


def test_invalid_tag_is_tag_invalid(client: httpx.Client) -> None:
    content = manifest_bytes(client, "acme/badtag")
    assert_oci_error(put_manifest(client, "acme/badtag", "-bad", content), 400, "TAG_INVALID")


def test_tag_list_pagination(client: httpx.Client) -> None:
    content = manifest_bytes(client, "acme/paged")
    names = ["alpha", "beta", "delta", "gamma", "omega"]
    for name in names:
        assert put_manifest(client, "acme/paged", name, content).status_code == 201

    full = client.get("/v2/acme/paged/tags/list")
    assert full.json() == {"name": "acme/paged", "tags": names}
    assert "Link" not in full.headers

    seen: list[str] = []
    url: str | None = "/v2/acme/paged/tags/list?n=2"
    pages = 0
    while url is not None:
        page = client.get(url)
        assert page.status_code == 200
        tags = page.json()["tags"]
        assert len(tags) <= 2
        seen += tags
        pages += 1
        link = page.headers.get("Link")
        if link is None:
            url = None
        else:
            assert link.endswith('>; rel="next"')
            url = link[1 : link.index(">")]
            assert url.startswith("/v2/acme/paged/tags/list?")
            assert f"last={tags[-1]}" in url
    assert seen == names
    assert pages == 3

    after = client.get("/v2/acme/paged/tags/list", params={"n": 10, "last": "delta"})
    assert after.json()["tags"] == ["gamma", "omega"]
    assert "Link" not in after.headers

    assert_oci_error(client.get("/v2/acme/nothing-here/tags/list"), 404, "NAME_UNKNOWN")


def test_referrers_api(client: httpx.Client) -> None:
    subject_content = manifest_bytes(client, "acme/refs", layers=[b"model"])
    subject_digest = sha256(subject_content)
    assert put_manifest(client, "acme/refs", "latest", subject_content).status_code == 201
    subject = {"mediaType": OCI_MANIFEST, "digest": subject_digest, "size": len(subject_content)}

    sbom_type = "application/vnd.example.sbom.v1"
    sig_type = "application/vnd.example.signature.v1"
    sbom = manifest_bytes(
        client,
        "acme/refs",
        layers=[b"sbom"],
        artifact_type=sbom_type,
        annotations={"kind": "sbom"},
        subject=subject,
    )
    pushed = put_manifest(client, "acme/refs", sha256(sbom), sbom)
    assert pushed.status_code == 201
    assert pushed.headers["OCI-Subject"] == subject_digest
    signature = manifest_bytes(
        client, "acme/refs", layers=[b"sig"], artifact_type=sig_type, subject=subject
    )
    assert put_manifest(client, "acme/refs", sha256(signature), signature).status_code == 201

    # a manifest without a subject gets no OCI-Subject header
    plain = put_manifest(client, "acme/refs", "plain", manifest_bytes(client, "acme/refs"))
    assert "OCI-Subject" not in plain.headers

    listed = client.get(f"/v2/acme/refs/referrers/{subject_digest}")
    assert listed.status_code == 200
    assert listed.headers["Content-Type"].startswith(OCI_INDEX)
    assert "OCI-Filters-Applied" not in listed.headers
    index = listed.json()
    assert index["schemaVersion"] == 2
    assert index["mediaType"] == OCI_INDEX
    by_digest = {entry["digest"]: entry for entry in index["manifests"]}
    assert set(by_digest) == {sha256(sbom), sha256(signature)}
    assert by_digest[sha256(sbom)]["artifactType"] == sbom_type
    assert by_digest[sha256(sbom)]["size"] == len(sbom)
    assert by_digest[sha256(sbom)]["mediaType"] == OCI_MANIFEST
    assert by_digest[sha256(sbom)]["annotations"] == {"kind": "sbom"}
    assert by_digest[sha256(signature)]["artifactType"] == sig_type

    filtered = client.get(
        f"/v2/acme/refs/referrers/{subject_digest}", params={"artifactType": sig_type}
    )
    assert filtered.headers["OCI-Filters-Applied"] == "artifactType"
    assert [entry["digest"] for entry in filtered.json()["manifests"]] == [sha256(signature)]

    # a digest nothing refers to: an empty index, not an error
    empty = client.get(f"/v2/acme/refs/referrers/{sha256(b'unrelated')}")
    assert empty.status_code == 200
    assert empty.json()["manifests"] == []

    assert_oci_error(client.get("/v2/acme/refs/referrers/sha256:nothex"), 400, "DIGEST_INVALID")


def test_manifest_delete_rules(client: httpx.Client) -> None:
    """Spec DELETE: by tag untags; by digest deletes with movable tags; release tags: 405."""
    content = manifest_bytes(client, "acme/deletes", layers=[b"release"])
    digest = sha256(content)
    assert put_manifest(client, "acme/deletes", "v1", content).status_code == 201
    assert put_manifest(client, "acme/deletes", "prod", content).status_code == 201
    assert put_manifest(client, "acme/deletes", "latest", content).status_code == 201

    # by tag, while other tags point at the version: only that tag goes
    assert client.delete("/v2/acme/deletes/manifests/prod").status_code == 202
    assert_oci_error(client.get("/v2/acme/deletes/manifests/prod"), 404, "MANIFEST_UNKNOWN")
    assert client.get(f"/v2/acme/deletes/manifests/{digest}").status_code == 200

    # an immutable release tag keeps its protection, with the spec's status and a message
    error = assert_oci_error(client.delete("/v2/acme/deletes/manifests/v1"), 405, "UNSUPPORTED")
    assert "v1" in error["message"]
    assert "immutable" in error["message"]
    error = assert_oci_error(
        client.delete(f"/v2/acme/deletes/manifests/{digest}"), 405, "UNSUPPORTED"
    )
    assert error["detail"]["tags"] == ["v1"]
    assert client.head("/v2/acme/deletes/manifests/latest").status_code == 200
    assert_oci_error(client.delete("/v2/acme/deletes/manifests/missing"), 404, "MANIFEST_UNKNOWN")

    # by digest of a version with movable tags only (what skopeo and oras send): all go
    channel = manifest_bytes(client, "acme/deletes", layers=[b"channel"])
    assert put_manifest(client, "acme/deletes", "latest", channel).status_code == 201
    assert put_manifest(client, "acme/deletes", "dev", channel).status_code == 201
    assert client.delete(f"/v2/acme/deletes/manifests/{sha256(channel)}").status_code == 202
    for reference in (sha256(channel), "latest", "dev"):
        assert_oci_error(
            client.get(f"/v2/acme/deletes/manifests/{reference}"), 404, "MANIFEST_UNKNOWN"
        )
    assert client.get("/v2/acme/deletes/tags/list").json()["tags"] == ["v1"]

    untagged = manifest_bytes(client, "acme/deletes", layers=[b"scratch"])
    assert put_manifest(client, "acme/deletes", sha256(untagged), untagged).status_code == 201
    assert client.delete(f"/v2/acme/deletes/manifests/{sha256(untagged)}").status_code == 202
    assert_oci_error(
        client.get(f"/v2/acme/deletes/manifests/{sha256(untagged)}"), 404, "MANIFEST_UNKNOWN"
    )


# --------------------------------------------------------------------------- errors


def test_errors_have_oci_shape_and_request_id(client: httpx.Client) -> None:
    response = client.get("/v2/acme/ghost/manifests/latest")
    error = assert_oci_error(response, 404, "NAME_UNKNOWN")
    assert "ghost" in error["message"]
    assert response.json()["request_id"] == response.headers["X-Request-Id"]

    pinned = client.get(
        f"/v2/acme/ghost/blobs/{sha256(b'x')}", headers={"X-Request-Id": "trace-me-123"}
    )
    assert pinned.headers["X-Request-Id"] == "trace-me-123"
    assert pinned.status_code == 404

    ok = client.get("/v2/")
    assert ok.headers["X-Request-Id"] != response.headers["X-Request-Id"]


def test_write_without_credentials_on_secured_server(secured_server: RegistryProcess) -> None:
    with httpx.Client(base_url=secured_server.url, timeout=30) as anonymous:
        response = anonymous.post(
            "/v2/acme/locked/blobs/uploads/", params={"digest": sha256(b"x")}, content=b"x"
        )
        assert_oci_error(response, 401, "UNAUTHORIZED")
        assert response.headers["WWW-Authenticate"].startswith("Bearer realm=")
    with httpx.Client(
        base_url=secured_server.url, timeout=30, auth=("anyone", ADMIN_TOKEN)
    ) as admin:
        assert push_blob(admin, "acme/locked", b"x") == sha256(b"x")


def test_tag_list_with_n_zero_or_negative(client: httpx.Client) -> None:
    # regression: n=0 used to crash with a 500 while building the Link header
    content = manifest_bytes(client, "acme/nzero")
    assert put_manifest(client, "acme/nzero", "latest", content).status_code == 201
    empty = client.get("/v2/acme/nzero/tags/list", params={"n": 0})
    assert empty.status_code == 200
    assert empty.json() == {"name": "acme/nzero", "tags": []}
    assert "Link" not in empty.headers
    assert_oci_error(client.get("/v2/acme/nzero/tags/list?n=-1"), 400, "INVALID_REQUEST")


def test_catalog_pagination(client: httpx.Client) -> None:
    names = ["acme/cat-a", "acme/cat-b", "acme/cat-c"]
    for name in names:
        push_blob(client, name, name.encode())
    first = client.get("/v2/_catalog", params={"n": 2})
    assert first.json() == {"repositories": names[:2]}
    link = first.headers["Link"]
    assert link.endswith('>; rel="next"')
    rest = client.get(link[1 : link.index(">")])
    assert rest.json() == {"repositories": names[2:]}
    assert "Link" not in rest.headers

    # regression: n=0 used to crash with a 500
    empty = client.get("/v2/_catalog", params={"n": 0})
    assert empty.status_code == 200
    assert empty.json() == {"repositories": []}
    assert_oci_error(client.get("/v2/_catalog?n=-1"), 400, "INVALID_REQUEST")


def test_descriptor_with_a_wrong_size_is_refused(client: httpx.Client) -> None:
    data = b"0123456789"
    digest = push_blob(client, "acme/sizes", data)
    config = push_blob(client, "acme/sizes", b"{}")
    document = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": EMPTY_JSON, "digest": config, "size": 2},
        "layers": [{"mediaType": "application/octet-stream", "digest": digest, "size": 2}],
    }
    content = json.dumps(document).encode()
    error = assert_oci_error(
        put_manifest(client, "acme/sizes", "latest", content), 400, "MANIFEST_INVALID"
    )
    assert "declares 2 bytes" in error["message"]
    assert "10" in error["message"]
    assert_oci_error(client.get("/v2/acme/sizes/manifests/latest"), 404, "MANIFEST_UNKNOWN")
