"""The default httpx transport, without a TLS context until a request needs one.

httpx builds its TLS context (loading every CA certificate) when a client
is made: a third of the start-up of a CLI command against a plain-HTTP
registry. This transport sends `http://` requests through a pool that has
no use for certificates and makes the verifying `https://` pool on the first
request with that scheme (a registry over TLS, a redirect to a presigned
store URL), with httpx's defaults for verification. httpx applies the
environment's proxies only to a client without a transport of its own, so
`HttpSession` uses this one only where no proxy is configured.

Reads from the socket are 4 MiB, not httpcore's 64 KiB: a 1 GiB blob GET
then takes 16,000 fewer trips through h11's receive buffer, which halved
the user CPU of a pull (profiled with py-spy; most of it was h11 copying
and slicing 64 KiB pieces). `READ_NUM_BYTES` is a class attribute of the
pinned httpcore's HTTP/1.1 connection with no other way to set it; it only
bounds one `recv`, so other httpx clients in the process are not affected
beyond reading larger pieces when more than 64 KiB are waiting.
"""

from __future__ import annotations

import threading

import httpcore
import httpx

READ_SIZE = 4 * 1024 * 1024
httpcore.HTTP11Connection.READ_NUM_BYTES = max(httpcore.HTTP11Connection.READ_NUM_BYTES, READ_SIZE)


class LazyTlsTransport(httpx.BaseTransport):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._plain: httpx.HTTPTransport | None = None
        self._tls: httpx.HTTPTransport | None = None

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        return self._for(request.url.scheme).handle_request(request)

    def close(self) -> None:
        with self._lock:
            for transport in (self._plain, self._tls):
                if transport is not None:
                    transport.close()
            self._plain = self._tls = None

    def _for(self, scheme: str) -> httpx.HTTPTransport:
        with self._lock:
            if scheme == "https":
                if self._tls is None:
                    self._tls = httpx.HTTPTransport()
                return self._tls
            if self._plain is None:
                # No TLS is ever spoken on this pool (its requests are plain
                # http), so it gets a context that loads no certificates.
                self._plain = httpx.HTTPTransport(verify=False)
            return self._plain
