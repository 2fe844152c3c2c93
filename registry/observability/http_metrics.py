"""ASGI middleware recording each request in the app's `Metrics`.

Requests are labelled by the route template the router matched (FastAPI's
`path_format`, e.g. `/v2/{name}/blobs/{digest}`), or `unmatched`, never by
the raw path, and by method among the HTTP methods the API uses (any
other becomes `OTHER`): the number of label values stays bounded whatever
clients send. Blob bytes are counted as they cross the wire: request bodies
of the upload routes (`in`), response bodies of blob GETs (`out`), for
successful (2xx) responses only, so an error document or a refused upload
adds nothing. Bodies the server moves in the kernel (`peftreg.receive_into`,
`peftreg.sendfile`) are counted as well, and also as zero-copy bytes. A GET
answered with a redirect to the store moves no bytes through the service.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from peftreg.registry.api.receive_into import RECEIVE_INTO, receive_into_of
from peftreg.registry.api.sendfile import SENDFILE
from peftreg.registry.observability.metrics import Metrics

UNMATCHED = "unmatched"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
OTHER_METHOD = "OTHER"
UPLOAD_ROUTES = frozenset({"/v2/{name}/blobs/uploads/", "/v2/{name}/blobs/uploads/{upload_id}"})
BLOB_ROUTE = "/v2/{name}/blobs/{digest}"


def route_template(scope: Scope) -> str:
    route = scope.get("route")
    template = getattr(route, "path_format", None) or getattr(route, "path", None)
    return template if isinstance(template, str) else UNMATCHED


def method_label(scope: Scope) -> str:
    method = str(scope.get("method", "")).upper()
    return method if method in METHODS else OTHER_METHOD


def _metrics_of(scope: Scope) -> Metrics | None:
    """The serving app's metrics, looked up per request (the app owns its services)."""
    app = scope.get("app")
    services = getattr(getattr(app, "state", None), "services", None)
    metrics = getattr(services, "metrics", None)
    return metrics if isinstance(metrics, Metrics) else None


class HttpMetricsMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        metrics = _metrics_of(scope) if scope["type"] == "http" else None
        if metrics is None:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the server answers if the app raises before responding
        received = sent = spliced = 0
        receive_into = receive_into_of(scope)
        if receive_into is not None:

            async def counting_receive_into(fd: int, landed: Callable[[int], None]) -> bool:
                def counting_landed(nbytes: int) -> None:  # on the server's worker thread,
                    nonlocal spliced  # while this request's task waits for it
                    landed(nbytes)
                    spliced += nbytes

                return await receive_into(fd, counting_landed)

            extensions = {
                **scope["extensions"],
                RECEIVE_INTO: {"receive_into": counting_receive_into},
            }
            scope = {**scope, "extensions": extensions}

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
            return message

        async def counting_send(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            elif message["type"] == SENDFILE:
                sent += message["count"]
                metrics.add_zero_copy_bytes("out", message["count"])
            await send(message)

        try:
            await self.app(scope, counting_receive, counting_send)
        finally:
            method = method_label(scope)
            route = route_template(scope)
            metrics.observe_request(method, route, status, time.perf_counter() - started)
            if 200 <= status < 300:
                if route in UPLOAD_ROUTES:
                    metrics.add_blob_bytes("in", received + spliced)
                    metrics.add_zero_copy_bytes("in", spliced)
                elif route == BLOB_ROUTE and method == "GET":
                    metrics.add_blob_bytes("out", sent)
