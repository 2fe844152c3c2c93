"""A request whose body is a file range, sent by the kernel (`sendfile`).

A streamed upload through httpx reads each block of the file into Python and
writes it to the socket: two copies per byte on the client's cores, which a
push shares with the hash (and, on one machine, with the server). Sent with
`socket.sendfile`, the body goes from the page cache to the socket in the
kernel. `HttpSession.send_file` uses this where it also reads large bodies
past httpx (`peftreg.sdk.direct_get`: its own transport, no proxy), for
plain-HTTP URLs; elsewhere the caller streams through httpx.
"""

from __future__ import annotations

import http.client
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import BinaryIO
from urllib.parse import urlsplit

from peftreg.sdk.errors import TransportError

PIECE = 16 * 1024 * 1024  # progress is reported per piece sent


@dataclass(frozen=True)
class SentResponse:
    status: int
    reason: str
    headers: Mapping[str, str]  # lower-case names
    content: bytes


def can_send_file(url: str) -> bool:
    return urlsplit(url).scheme == "http"


def send_file(
    method: str,
    url: str,
    headers: Mapping[str, str],
    file: BinaryIO,
    offset: int,
    count: int,
    *,
    timeout: float | None,
    sent: Callable[[int], None],
) -> SentResponse:
    """Send `count` bytes of `file` from `offset` as the body of one request to a plain
    HTTP `url`; the response, whatever its status.

    `sent(n)` is called as each further `n` bytes are on their way. A connection
    that breaks raises `TransportError`, unless the server answered before it
    closed (an error it found before reading the body): then that answer. A
    file shorter than `offset + count` raises `OSError` (not retried).
    """
    parts = urlsplit(url)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=timeout)
    try:
        try:
            connection.putrequest(method, target, skip_accept_encoding=True)
            for name, value in headers.items():
                connection.putheader(name, value)
            connection.putheader("Content-Length", str(count))
            connection.endheaders()
            sock = connection.sock
            assert sock is not None
            end = offset + count
            position = offset
            while position < end:
                moved = sock.sendfile(file, position, min(PIECE, end - position))
                if moved == 0:
                    break
                position += moved
                sent(moved)
        except OSError as exc:
            answer = _answer_if_any(connection)
            if answer is None:
                raise TransportError(f"sending to {parts.netloc} broke: {exc}") from exc
            return answer
        if position < end:  # the file, not the connection: sending again cannot help
            raise OSError(
                f"{file.name} shrank while it was being pushed: {end - position} bytes missing"
            )
        answer = _answer_if_any(connection)
        if answer is None:
            raise TransportError(f"{parts.netloc} closed the connection without an answer")
        return answer
    finally:
        connection.close()


def _answer_if_any(connection: http.client.HTTPConnection) -> SentResponse | None:
    try:
        response = connection.getresponse()
        content = response.read()
    except (OSError, http.client.HTTPException):
        return None
    return SentResponse(
        response.status,
        response.reason,
        {name.lower(): value for name, value in response.getheaders()},
        content,
    )
