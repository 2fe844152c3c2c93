"""Blob bytes moved by the kernel (`peftreg.registry.zero_copy`), in a real server.

`peftreg serve` offers the `peftreg.sendfile` extension and the filesystem
store's blob GET uses it: what a client reads must be the blob (whole or a
range), on a connection that then serves the next request, and a client that
goes away mid-body must leave the server serving. It offers
`peftreg.receive_into` too, and uploads splice their bodies from the socket
into the session's file: the blob must be exactly the bytes sent, a request
sent right behind the body must be answered, and a client gone mid-body
must leave what landed in the session, to resume from. The metric
`blob_bytes_zero_copy_total{direction}` says the bytes went that way.
"""

from __future__ import annotations

import http.client
import os
import socket
import struct
import time
from pathlib import Path

import httpx
import pytest

from peftreg.cache import Cache
from peftreg.digest import Digest
from peftreg.sdk.http import HttpSession
from peftreg.transfer.download import download_blob
from peftreg.transfer.upload import upload_blob
from tests.fixtures.server import RegistryProcess
from tests.observability.test_metrics import parse, scrape, value

REPO = "acme/zero-copy"
SIZE = 24 * 1024 * 1024 + 5  # several socket buffers, and not a multiple of any chunk


@pytest.fixture(scope="module")
def blob(server: RegistryProcess, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, bytes]:
    data = os.urandom(SIZE)
    path = tmp_path_factory.mktemp("zero-copy") / "blob.bin"
    path.write_bytes(data)
    digest = Digest.of_bytes(data)
    with HttpSession(server.url) as http:
        upload_blob(http, REPO, digest, SIZE, path)
    return str(digest), data


def _zero_copy_bytes(server: RegistryProcess) -> float:
    return value(parse(scrape(server.url).text), "blob_bytes_zero_copy_total", direction="out")


def test_a_blob_and_a_range_arrive_whole_on_one_kept_alive_connection(
    server: RegistryProcess, blob: tuple[str, bytes]
) -> None:
    digest, data = blob
    before = _zero_copy_bytes(server)
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        connection.request("GET", f"/v2/{REPO}/blobs/{digest}")
        whole = connection.getresponse()
        assert (whole.status, whole.getheader("content-length")) == (200, str(SIZE))
        received = bytearray()
        while piece := whole.read(64 * 1024):  # a slow reader: the socket fills, send waits
            received += piece
        assert received == data

        connection.request("GET", f"/v2/{REPO}/blobs/{digest}", headers={"Range": "bytes=7-"})
        part = connection.getresponse()
        assert part.status == 206
        assert part.getheader("content-range") == f"bytes 7-{SIZE - 1}/{SIZE}"
        assert part.read() == data[7:]

        connection.request("HEAD", f"/v2/{REPO}/blobs/{digest}")
        head = connection.getresponse()
        assert (head.status, head.read()) == (200, b"")
    finally:
        connection.close()
    assert _zero_copy_bytes(server) - before == SIZE + SIZE - 7


def test_a_pull_through_the_sdk_is_verified_after_a_zero_copy_send(
    server: RegistryProcess, blob: tuple[str, bytes], tmp_path: Path
) -> None:
    digest, data = blob
    before = _zero_copy_bytes(server)
    cache = Cache(tmp_path / "cache")
    with HttpSession(server.url) as http:
        result = download_blob(http, REPO, Digest.parse(digest), SIZE, cache)
    assert result.path.read_bytes() == data
    assert _zero_copy_bytes(server) - before == SIZE


def test_a_client_gone_mid_body_leaves_the_server_serving(
    server: RegistryProcess, blob: tuple[str, bytes]
) -> None:
    digest, data = blob
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", server.port), timeout=60) as gone:
            request = f"GET /v2/{REPO}/blobs/{digest} HTTP/1.1\r\nHost: registry\r\n\r\n"
            gone.sendall(request.encode())
            head = b""
            while b"\r\n" not in head:
                head += gone.recv(65536)
            assert head.startswith(b"HTTP/1.1 200")
            # Closed with a reset (linger 0), as a killed client's would be.
            gone.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    # The server answers other requests, and the whole blob again. (Last in this file: the
    # reset sends may still be counted in the metric the other tests compare.)
    response = httpx.get(f"{server.url}/v2/{REPO}/blobs/{digest}", timeout=60)
    assert response.status_code == 200
    assert response.content == data


def _zero_copy_in(server: RegistryProcess) -> float:
    return value(parse(scrape(server.url).text), "blob_bytes_zero_copy_total", direction="in")


def _start_session(server: RegistryProcess, repository: str) -> str:
    response = httpx.post(f"{server.url}/v2/{repository}/blobs/uploads/", timeout=60)
    assert response.status_code == 202, response.text
    return response.headers["location"]


def _response_head(connection: socket.socket) -> tuple[bytes, bytes]:
    """One response's status line and headers, and whatever arrived after them."""
    received = b""
    while b"\r\n\r\n" not in received:
        piece = connection.recv(65536)
        assert piece, f"the server closed the connection after {received!r}"
        received += piece
    head, _, rest = received.partition(b"\r\n\r\n")
    return head, rest


def test_an_upload_body_is_spliced_and_a_request_right_behind_it_is_answered(
    server: RegistryProcess, tmp_path: Path
) -> None:
    repository = "acme/spliced"
    data = os.urandom(SIZE)
    digest = Digest.of_bytes(data)
    location = _start_session(server, repository)
    before = _zero_copy_in(server)
    patch = (
        f"PATCH {location} HTTP/1.1\r\nHost: registry\r\n"
        f"Content-Type: application/octet-stream\r\nContent-Length: {SIZE}\r\n\r\n"
    ).encode()
    # The next request goes out in the same writes as the body's end (pipelined).
    status = f"GET {location} HTTP/1.1\r\nHost: registry\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as connection:
        connection.sendall(patch + data + status)
        head, rest = _response_head(connection)
        assert head.startswith(b"HTTP/1.1 202"), head
        assert f"range: 0-{SIZE - 1}".encode() in head.lower()
        while rest.count(b"\r\n\r\n") < 1:
            rest += connection.recv(65536)
        assert rest.startswith(b"HTTP/1.1 204"), rest
        assert f"range: 0-{SIZE - 1}".encode() in rest.lower()
    assert _zero_copy_in(server) - before == SIZE

    done = httpx.put(f"{server.url}{location}", params={"digest": str(digest)}, timeout=60)
    assert done.status_code == 201, done.text
    cache = Cache(tmp_path / "cache")
    with HttpSession(server.url) as http:
        assert download_blob(http, repository, digest, SIZE, cache).path.read_bytes() == data


def test_a_client_gone_mid_upload_leaves_what_landed_to_resume_from(
    server: RegistryProcess,
) -> None:
    repository = "acme/spliced-cut"
    data = os.urandom(SIZE)
    digest = Digest.of_bytes(data)
    location = _start_session(server, repository)
    sent = 10 * 1024 * 1024 + 3
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as gone:
        gone.sendall(
            f"PATCH {location} HTTP/1.1\r\nHost: registry\r\nExpect: 100-continue\r\n"
            f"Content-Type: application/octet-stream\r\nContent-Length: {SIZE}\r\n\r\n".encode()
        )
        head, _rest = _response_head(gone)  # asked for, it comes before the body
        assert head.startswith(b"HTTP/1.1 100"), head
        gone.sendall(data[:sent])
    # Until the server has seen the close, the session may hold less: never more.
    deadline = time.monotonic() + 120
    while True:
        status = httpx.get(f"{server.url}{location}", timeout=60)
        assert status.status_code == 204, status.text
        held = int(status.headers["range"].rpartition("-")[2]) + 1
        assert held <= sent
        if held == sent or time.monotonic() > deadline:
            break
    assert held == sent

    rest = httpx.patch(
        f"{server.url}{location}",
        content=data[sent:],
        headers={"Content-Range": f"{sent}-{SIZE - 1}", "Content-Type": "application/octet-stream"},
        timeout=60,
    )
    assert rest.status_code == 202, rest.text
    done = httpx.put(f"{server.url}{location}", params={"digest": str(digest)}, timeout=60)
    assert done.status_code == 201, done.text
    blob = httpx.get(f"{server.url}/v2/{repository}/blobs/{digest}", timeout=60)
    assert blob.content == data
