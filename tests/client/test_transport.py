"""The SDK's default transport: plain HTTP without TLS set-up, HTTPS verified as httpx does.

Real servers on loopback: a plain one that redirects, and a TLS one whose
self-signed certificate (made here with `openssl`) is trusted only when
`SSL_CERT_FILE` names it. Large bodies (`HttpSession.body(..., large=True)`)
are read with http.client (`peftreg.sdk.direct_get`), which must keep every
rule of the httpx path: verification, redirects, the token, errors, proxies.
File bodies (`HttpSession.send_file`, a push's upload) are sent by the kernel
on plain HTTP, to a real registry, and go through httpx elsewhere.
"""

from __future__ import annotations

import http.server
import os
import ssl
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from peftreg.digest import Digest
from peftreg.sdk.errors import NotFound, TransportError
from peftreg.sdk.http import HttpSession
from tests.fixtures.server import RegistryProcess


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    target = ""
    seen: list[dict[str, str]]  # each request's path and headers, per server

    def do_GET(self) -> None:
        self.seen.append({"path": self.path, **{k.lower(): v for k, v in self.headers.items()}})
        if self.path in ("/redirect", "/redirect-here"):
            self.send_response(307)
            here = self.path == "/redirect-here"
            self.send_header("Location", "/blob" if here else f"{self.target}/blob")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path == "/missing":
            body = b'{"errors": [{"code": "BLOB_UNKNOWN", "message": "no such blob"}]}'
            self.send_response(404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        body = b"over " + (b"tls" if isinstance(self.connection, ssl.SSLSocket) else b"plain")
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def _serve(
    context: ssl.SSLContext | None, target: str = "", seen: list[dict[str, str]] | None = None
) -> Iterator[str]:
    handler = type("Handler", (_Handler,), {"target": target, "seen": [] if seen is None else seen})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    if context is not None:
        server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    scheme = "https" if context is not None else "http"
    try:
        yield f"{scheme}://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
            "-addext", "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.fixture
def tls_url(certificate: tuple[Path, Path]) -> Iterator[str]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*certificate)
    with _serve(context) as url:
        yield url


def test_plain_http_works() -> None:
    with _serve(None) as url, HttpSession(url) as http:
        assert http.request("GET", "/blob").content == b"over plain"


def test_https_is_verified(tls_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    with HttpSession(tls_url, retries=0) as http, pytest.raises(TransportError):
        http.request("GET", "/blob")


def test_redirect_from_plain_http_to_trusted_https(
    tls_url: str, certificate: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(certificate[0]))
    with _serve(None, target=tls_url) as url, HttpSession(url) as http:
        assert http.request("GET", "/redirect").content == b"over tls"


def test_redirect_to_untrusted_https_fails(tls_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    with (
        _serve(None, target=tls_url) as url,
        HttpSession(url, retries=0) as http,
        pytest.raises(TransportError),
    ):
        http.request("GET", "/redirect")


def _large(http: HttpSession, path: str) -> bytes:
    with http.body(path, large=True) as body:
        assert body.status_code == 200
        return b"".join(body.chunks(4))


def test_a_large_body_is_read_past_httpx_with_the_sessions_token() -> None:
    seen: list[dict[str, str]] = []
    with _serve(None, seen=seen) as url, HttpSession(url, token="secret") as http:
        assert _large(http, "/blob") == b"over plain"
        with http.body("/blob") as small:
            assert b"".join(small.chunks(4)) == b"over plain"
    direct, through_httpx = seen
    assert direct["authorization"] == through_httpx["authorization"] == "Bearer secret"
    assert direct["accept-encoding"] == "identity"  # http.client: nothing to decode
    assert "gzip" in through_httpx["accept-encoding"]


def test_a_large_body_follows_redirects_and_keeps_the_token_only_on_its_origin(
    tls_url: str, certificate: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(certificate[0]))
    seen: list[dict[str, str]] = []
    with (
        _serve(None, target=tls_url, seen=seen) as url,
        HttpSession(url, token="secret") as http,
    ):
        assert _large(http, "/redirect-here") == b"over plain"
        assert _large(http, "/redirect") == b"over tls"
    assert [(r["path"], r.get("authorization")) for r in seen] == [
        ("/redirect-here", "Bearer secret"),
        ("/blob", "Bearer secret"),
        ("/redirect", "Bearer secret"),
    ]  # the TLS server saw the last GET, without the token


def test_a_large_body_from_untrusted_https_fails(
    tls_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    with (
        _serve(None, target=tls_url) as url,
        HttpSession(url, retries=0) as http,
        pytest.raises(TransportError),
    ):
        _large(http, "/redirect")


def test_a_large_body_answered_with_an_error_raises_the_typed_error() -> None:
    with (
        _serve(None) as url,
        HttpSession(url, retries=0) as http,
        pytest.raises(NotFound) as caught,
    ):
        _large(http, "/missing")
    assert caught.value.code == "BLOB_UNKNOWN"


def test_a_proxy_in_the_environment_is_used_for_every_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[dict[str, str]] = []
    with _serve(None, seen=seen) as url:
        monkeypatch.setenv("HTTP_PROXY", url)  # this server answers the proxied GET itself
        monkeypatch.setenv("NO_PROXY", "")
        with HttpSession("http://registry.invalid") as http:
            assert http.request("GET", "/blob").content == b"over plain"
            assert _large(http, "/blob") == b"over plain"
    # Both went to the proxy (absolute-form targets), through httpx.
    assert [r["path"] for r in seen] == ["http://registry.invalid/blob"] * 2


def test_a_file_body_is_sent_by_the_kernel_and_errors_keep_their_type(
    server: RegistryProcess, tmp_path: Path
) -> None:
    """`HttpSession.send_file` (peftreg.sdk.direct_send): the upload a push makes."""
    data = os.urandom(20 * 1024 * 1024 + 11)
    path = tmp_path / "blob.bin"
    path.write_bytes(b"skipped" + data)
    digest = Digest.of_bytes(data)
    repository = "acme/sent-by-kernel"
    progress: list[int] = []
    with HttpSession(server.url) as http, path.open("rb") as file:
        assert http.can_send_file("/v2/")
        location = http.request("POST", f"/v2/{repository}/blobs/uploads/").headers["location"]
        headers = {"Content-Type": "application/octet-stream"}
        sent = http.send_file(
            "PATCH", location, file, 7, len(data), headers=headers, sent=progress.append
        )
        assert sent.status_code == 202
        assert sent.headers["range"] == f"0-{len(data) - 1}"
        assert sum(progress) == len(data)
        http.request("PUT", sent.headers["location"], params={"digest": str(digest)})
        assert http.request("GET", f"/v2/{repository}/blobs/{digest}").content == data
        # An error answer raises its typed error, as through httpx.
        with pytest.raises(NotFound, match="is not open"):
            http.send_file(
                "PATCH",
                f"/v2/{repository}/blobs/uploads/no-such-session",
                file,
                0,
                100,
                headers=headers,
                sent=lambda _n: None,
            )


def test_file_bodies_go_through_httpx_over_tls_or_a_proxy(
    tls_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with HttpSession(tls_url) as http:
        assert not http.can_send_file("/v2/")
    with HttpSession("http://registry.invalid") as http:
        assert http.can_send_file("/v2/")
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    with HttpSession("http://registry.invalid") as http:
        assert not http.can_send_file("/v2/")
