"""Large response bodies read with the standard library's http.client.

httpx reads a body through h11, which copies every piece in Python on its way
from the socket (into its receive buffer, out of it, and the buffer's shift):
receiving a 1 GiB blob over loopback took 1.03-1.20 s of CPU through httpx and
0.15-0.22 s through `http.client`, whose `read(n)` fills one new bytes object
straight from the socket (`benchmarks/bench_transfer.py` has the pull's
figures). So a large blob GET is sent with `http.client` when nothing httpx
does for the session is needed: its own transport (no test seam or transport a
caller passed in) and no proxy configured in the environment. Redirects are
followed here (a presigned store URL), dropping the `Authorization` header when
the origin changes, as httpx does. Any status but 200 or 206, or a content
encoding, hands the request back to httpx (`None`), which answers it as before:
its error mapping, its retries. On a plain connection the body can go
straight from the socket into the download's file (`DirectBody.splice_into`,
`peftreg.splice`), never passing through Python.
"""

from __future__ import annotations

import http.client
import os
import ssl
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from urllib.parse import urljoin, urlsplit

from peftreg.sdk.errors import TransportError
from peftreg.splice import can_splice, socket_to_file

REDIRECTS = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 5
HEAD_READ = 64 * 1024  # the first read of a spliced body takes what http.client buffered


def proxies_configured() -> bool:
    """Whether the environment names a proxy (httpx sends through it); `no_proxy` alone
    names none."""
    return any(scheme != "no" for scheme in urllib.request.getproxies())


class DirectBody:
    """A 200 or 206 response whose body is read in pieces of at most `chunk` bytes."""

    def __init__(self, connection: http.client.HTTPConnection, response: http.client.HTTPResponse):
        self._connection = connection
        self._response = response
        self.status_code = response.status
        self.headers: Mapping[str, str] = {
            name.lower(): value for name, value in response.getheaders()
        }

    def chunks(self, chunk: int) -> Iterator[bytes]:
        try:
            while piece := self._response.read(chunk):
                yield piece
        except (OSError, http.client.HTTPException) as exc:
            raise TransportError(f"the body of a GET broke: {exc!r}") from exc

    def splice_into(self, fd: int, limit: int, landed: Callable[[int], None]) -> bool:
        """Move the body into `fd` at its position without copying it through Python
        (`peftreg.splice`); `landed(n)` as each further `n` bytes are in the file.

        False, with nothing read, where that cannot be done: TLS, a chunked body
        or one of unknown length, or one longer than `limit`; `chunks` then reads
        it. A body that ends early returns True with fewer bytes landed.
        """
        response = self._response
        sock = self._connection.sock
        if (
            not can_splice(sock)
            or response.chunked
            or response.length is None
            or response.length > limit
        ):
            return False
        try:
            # What http.client has buffered past the headers (or one read): after it
            # its buffer is empty and the rest is still in the socket.
            head = response.read1(min(response.length, HEAD_READ)) if response.length else b""
        except (OSError, http.client.HTTPException) as exc:
            raise TransportError(f"the body of a GET broke: {exc!r}") from exc
        view = memoryview(head)
        while view:
            view = view[os.write(fd, view) :]
        if head:
            landed(len(head))
        if head and response.length:
            try:
                socket_to_file(
                    sock.fileno(), fd, response.length, landed, timeout=sock.gettimeout()
                )
            except ConnectionError as exc:
                raise TransportError(f"the body of a GET broke: {exc}") from exc
        return True

    def close(self) -> None:
        self._connection.close()


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme, parts.netloc


def _connect(
    url: str, timeout: float | None, ssl_context: Callable[[], ssl.SSLContext]
) -> http.client.HTTPConnection:
    parts = urlsplit(url)
    if parts.scheme == "https":
        return http.client.HTTPSConnection(
            parts.hostname or "", parts.port, timeout=timeout, context=ssl_context()
        )
    return http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=timeout)


def open_body(
    url: str,
    headers: Mapping[str, str],
    *,
    timeout: float | None,
    ssl_context: Callable[[], ssl.SSLContext],
) -> DirectBody | None:
    """GET `url` (absolute, http or https); the body to read, or None for httpx to answer.

    Connection failures raise `TransportError`, like the session's own.
    """
    sent = dict(headers)
    for _ in range(MAX_REDIRECTS + 1):
        if urlsplit(url).scheme not in ("http", "https"):
            return None
        parts = urlsplit(url)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        connection = _connect(url, timeout, ssl_context)
        try:
            connection.request("GET", target or "/", headers=sent)
            response = connection.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            connection.close()
            raise TransportError(f"cannot reach {parts.scheme}://{parts.netloc}: {exc}") from exc
        location = response.getheader("location")
        if response.status in REDIRECTS and location:
            connection.close()
            following = urljoin(url, location)
            if _origin(following) != _origin(url):
                sent = {k: v for k, v in sent.items() if k.lower() != "authorization"}
            url = following
            continue
        if response.status not in (200, 206) or response.getheader("content-encoding"):
            connection.close()
            return None
        return DirectBody(connection, response)
    return None
