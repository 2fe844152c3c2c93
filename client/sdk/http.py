"""The one place every HTTP request of the SDK goes through.

`HttpSession` adds the token, retries idempotent requests (and connection
errors) with exponential backoff, follows redirects (a blob GET may answer
307 to a presigned store URL) and turns every error response into a typed
exception with `error_from_response`. The httpx transport is injectable so
tests can put their own seam under it.
"""

from __future__ import annotations

import json
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, BinaryIO, Protocol
from urllib.parse import urljoin

import httpx

from peftreg.sdk.direct_get import open_body, proxies_configured
from peftreg.sdk.direct_send import can_send_file, send_file
from peftreg.sdk.errors import PeftregError, TransportError, error_class
from peftreg.sdk.transport import LazyTlsTransport

Scalar = str | int | float | bool | None
QueryParams = Mapping[str, Scalar | Sequence[Scalar]] | list[tuple[str, Scalar]]
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})
RETRY_STATUSES = frozenset({429, 502, 503, 504})
DEFAULT_TIMEOUT = httpx.Timeout(60.0, connect=10.0)
USER_AGENT = "peftreg-sdk/0.1"


def error_from_response(response: httpx.Response) -> PeftregError:
    """The typed exception for an error response (OCI error shape or not)."""
    request_id = response.headers.get("x-request-id")
    code: str | None = None
    message = ""
    detail: Any = None
    body: Any = None
    if response.request.method != "HEAD":
        try:
            body = json.loads(response.read() or b"null")
        except (ValueError, httpx.StreamError):
            body = None
    if isinstance(body, dict):
        errors = body.get("errors")
        if isinstance(errors, list) and errors and isinstance(errors[0], dict):
            first = errors[0]
            code = str(first["code"]) if first.get("code") is not None else None
            message = str(first.get("message") or "")
            detail = first.get("detail")
        if isinstance(body.get("request_id"), str):
            request_id = request_id or body["request_id"]
    if not message:
        reason = response.reason_phrase or "error"
        request = response.request
        message = f"{request.method} {request.url.path}: {response.status_code} {reason}"
    cls = error_class(code, response.status_code)
    return cls(
        message, code=code, status=response.status_code, request_id=request_id, detail=detail
    )


class Body(Protocol):
    """A successful GET's status, headers (lower-case names) and body, read in pieces."""

    status_code: int
    headers: Mapping[str, str]

    def chunks(self, chunk: int) -> Iterator[bytes]: ...

    def splice_into(self, fd: int, limit: int, landed: Callable[[int], None]) -> bool:
        """Move the body into the file `fd` in the kernel, if this body can; else False."""
        ...


class _HttpxBody:
    def __init__(self, response: httpx.Response) -> None:
        self.status_code = response.status_code
        self.headers: Mapping[str, str] = response.headers
        self._response = response

    def chunks(self, chunk: int) -> Iterator[bytes]:
        # Pieces as the transport delivers them (no re-chunking copy), decoded if encoded.
        if "content-encoding" in self._response.headers:
            return self._response.iter_bytes()
        return self._response.iter_raw()

    def splice_into(self, fd: int, limit: int, landed: Callable[[int], None]) -> bool:
        return False  # httpx reads the socket itself


class HttpSession:
    """An httpx client bound to one registry, with auth, retries and error mapping."""

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        transport: httpx.BaseTransport | None = None,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        retries: int = 4,
        backoff: float = 0.25,
        max_backoff: float = 8.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.retries = max(0, retries)
        self.backoff = backoff
        self.max_backoff = max_backoff
        headers = {"User-Agent": USER_AGENT}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._headers = headers
        # httpx honours the environment's proxies only with its own transport: with one,
        # the session keeps it. Without, large bodies skip httpx (peftreg.sdk.direct_get).
        self._direct = transport is None and not proxies_configured()
        if self._direct:
            transport = LazyTlsTransport()
        self._ssl_lock = threading.Lock()
        self._ssl: ssl.SSLContext | None = None
        self._client = httpx.Client(
            base_url=self.base_url,
            headers=headers,
            transport=transport,
            timeout=timeout,
            follow_redirects=True,
        )

    def close(self) -> None:
        self._client.close()

    def url(self, path: str) -> str:
        """An absolute URL for a path or a `Location` header the server sent."""
        return urljoin(self.base_url + "/", path)

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry number `attempt` (0-based)."""
        return float(min(self.max_backoff, self.backoff * (2**attempt)))

    def request(
        self,
        method: str,
        path: str,
        *,
        params: QueryParams | None = None,
        headers: Mapping[str, str] | None = None,
        content: bytes | Iterable[bytes] | None = None,
        json_body: Any = None,
        idempotent: bool | None = None,
        ok: tuple[int, ...] = (),
        timeout: httpx.Timeout | None = None,
    ) -> httpx.Response:
        """Send a request; return the response or raise the typed error.

        `ok` lists extra statuses to hand back instead of raising (e.g. 404
        for an existence check). Idempotent requests are retried on
        connection errors and 429/502/503/504; others are sent once.
        `timeout` replaces the session's for this request (e.g. a long poll).
        A streamed `content` (an iterable) is sent once: it cannot be replayed.
        """
        retry = method.upper() in IDEMPOTENT_METHODS if idempotent is None else idempotent
        retry = retry and (content is None or isinstance(content, bytes))
        if json_body is not None:
            content = json.dumps(json_body).encode()
            headers = {**(headers or {}), "Content-Type": "application/json"}
        attempt = 0
        while True:
            try:
                response = self._client.request(
                    method,
                    self.url(path),
                    params=params,
                    headers=headers,
                    content=content,
                    timeout=httpx.USE_CLIENT_DEFAULT if timeout is None else timeout,
                )
            except httpx.TransportError as exc:
                if retry and attempt < self.retries:
                    time.sleep(self.delay(attempt))
                    attempt += 1
                    continue
                raise TransportError(f"cannot reach {self.base_url}: {exc}") from exc
            if response.status_code in RETRY_STATUSES and retry and attempt < self.retries:
                response.close()
                time.sleep(self.delay(attempt))
                attempt += 1
                continue
            if response.is_success or response.status_code in ok:
                return response
            raise error_from_response(response)

    @contextmanager
    def stream(
        self, method: str, path: str, *, headers: Mapping[str, str] | None = None
    ) -> Iterator[httpx.Response]:
        """A streamed response (body not read yet); errors raised before yielding.

        Opening the stream is retried like an idempotent request; a break
        in the middle of the body is for the caller to resume (with Range).
        """
        attempt = 0
        while True:
            try:
                request = self._client.build_request(method, self.url(path), headers=headers)
                response = self._client.send(request, stream=True)
            except httpx.TransportError as exc:
                if attempt < self.retries:
                    time.sleep(self.delay(attempt))
                    attempt += 1
                    continue
                raise TransportError(f"cannot reach {self.base_url}: {exc}") from exc
            if response.status_code in RETRY_STATUSES and attempt < self.retries:
                response.close()
                time.sleep(self.delay(attempt))
                attempt += 1
                continue
            break
        try:
            if not response.is_success:
                raise error_from_response(response)
            yield response
        finally:
            response.close()

    @contextmanager
    def body(
        self, path: str, *, headers: Mapping[str, str] | None = None, large: bool = False
    ) -> Iterator[Body]:
        """A GET's body to read in pieces; errors raised before yielding, as `stream`.

        A `large` body is read with http.client where the session allows
        (`peftreg.sdk.direct_get`: a fifth of httpx's CPU per byte); an error
        status, or a session with a proxy or a transport of its own, goes
        through httpx.
        """
        if large and self._direct:
            sent = {**self._headers, "Accept-Encoding": "identity", **(headers or {})}
            direct = open_body(
                self.url(path), sent, timeout=self._client.timeout.read, ssl_context=self._tls
            )
            if direct is not None:
                try:
                    yield direct
                finally:
                    direct.close()
                return
        with self.stream("GET", path, headers=headers) as response:
            yield _HttpxBody(response)

    def can_send_file(self, path: str) -> bool:
        """Whether `send_file` can send to `path`: plain HTTP, no proxy, no transport of the
        caller's own (as for reading large bodies past httpx)."""
        return self._direct and can_send_file(self.url(path))

    def send_file(
        self,
        method: str,
        path: str,
        file: BinaryIO,
        offset: int,
        count: int,
        *,
        headers: Mapping[str, str],
        sent: Callable[[int], None],
    ) -> httpx.Response:
        """Send `count` bytes of `file` from `offset` as the body, from the kernel
        (`peftreg.sdk.direct_send`). Only where `can_send_file`: elsewhere (a proxy, a
        transport of its own, https) bodies stream through httpx.

        Sent once, never retried: error statuses raise their typed error, and a
        broken connection `TransportError`, for the caller to resume.
        """
        url = self.url(path)
        if not self.can_send_file(path):
            raise ValueError(f"this session sends bodies through httpx, not to {url}")
        answer = send_file(
            method,
            url,
            {**self._headers, **headers},
            file,
            offset,
            count,
            timeout=self._client.timeout.read,
            sent=sent,
        )
        response = httpx.Response(
            answer.status,
            headers=answer.headers,
            content=answer.content,
            request=httpx.Request(method, url),
        )
        if not response.is_success:
            raise error_from_response(response)
        return response

    def _tls(self) -> ssl.SSLContext:
        """The verifying context httpx's own https transport makes, made on first use."""
        with self._ssl_lock:
            if self._ssl is None:
                self._ssl = httpx.create_ssl_context()
            return self._ssl

    def __enter__(self) -> HttpSession:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
