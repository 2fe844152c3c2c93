"""The SDK's default transport: plain HTTP without TLS set-up, HTTPS verified as httpx does.

Real servers on loopback: a plain one that redirects, and a TLS one whose
self-signed certificate (made here with `openssl`) is trusted only when
`SSL_CERT_FILE` names it.
"""

from __future__ import annotations

import http.server
import ssl
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from peftreg.sdk.errors import TransportError
from peftreg.sdk.http import HttpSession


class _Handler(http.server.BaseHTTPRequestHandler):
    target = ""

    def do_GET(self) -> None:
        if self.path == "/redirect":
            self.send_response(307)
            self.send_header("Location", f"{self.target}/blob")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = b"over " + (b"tls" if isinstance(self.connection, ssl.SSLSocket) else b"plain")
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def _serve(context: ssl.SSLContext | None, target: str = "") -> Iterator[str]:
    handler = type("Handler", (_Handler,), {"target": target})
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
