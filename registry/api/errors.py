"""The one table from domain error to HTTP status and OCI error code.

Bodies use the OCI error shape on every route, `/api/v1` included:
`{"errors": [{"code": ..., "message": ..., "detail": ...}]}`, and carry
the request id so a user can quote it.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from peftreg.registry import errors
from peftreg.registry.context import current_request_id
from peftreg.registry.db.engine import DatabaseUnreachable
from peftreg.registry.storage.errors import StorageUnavailable

ERROR_TABLE: dict[type[errors.RegistryError], tuple[int, str]] = {
    errors.NameInvalid: (400, "NAME_INVALID"),
    errors.NameUnknown: (404, "NAME_UNKNOWN"),
    errors.TagInvalid: (400, "TAG_INVALID"),
    errors.DigestInvalid: (400, "DIGEST_INVALID"),
    errors.BlobUnknown: (404, "BLOB_UNKNOWN"),
    errors.BlobUploadUnknown: (404, "BLOB_UPLOAD_UNKNOWN"),
    errors.BlobUploadInvalid: (400, "BLOB_UPLOAD_INVALID"),
    errors.UploadInUse: (409, "BLOB_UPLOAD_INVALID"),
    errors.RangeInvalid: (416, "RANGE_INVALID"),
    errors.ManifestInvalid: (400, "MANIFEST_INVALID"),
    errors.ManifestUnknown: (404, "MANIFEST_UNKNOWN"),
    errors.ManifestBlobUnknown: (400, "MANIFEST_BLOB_UNKNOWN"),
    errors.ManifestTooLarge: (413, "MANIFEST_TOO_LARGE"),
    errors.ArtifactInvalid: (422, "ADAPTER_INVALID"),
    errors.SafetensorsInvalid: (422, "SAFETENSORS_INVALID"),
    errors.LayerTitleInvalid: (422, "LAYER_TITLE_INVALID"),
    errors.TagImmutable: (409, "TAG_IMMUTABLE"),
    errors.VersionInUse: (409, "VERSION_IN_USE"),
    errors.DeleteUnsupported: (405, "UNSUPPORTED"),
    errors.Unauthorized: (401, "UNAUTHORIZED"),
    errors.InsufficientScope: (403, "DENIED"),
    errors.Denied: (403, "DENIED"),
    errors.TokenUnknown: (404, "TOKEN_UNKNOWN"),
    errors.NotFound: (404, "NOT_FOUND"),
    errors.InvalidRequest: (400, "INVALID_REQUEST"),
    errors.JobUnknown: (404, "JOB_UNKNOWN"),
    errors.JobInvalid: (422, "JOB_INVALID"),
    errors.BaseIncompatible: (409, "BASE_INCOMPATIBLE"),
    errors.JobFinished: (409, "JOB_FINISHED"),
}

# Errors the framework raises before a route runs (no route, wrong method, a body that
# does not parse), by status.
HTTP_CODES = {400: "INVALID_REQUEST", 404: "NOT_FOUND", 405: "UNSUPPORTED"}

HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")

logger = logging.getLogger(__name__)


def error_body(code: str, message: str, detail: Any = None) -> dict[str, Any]:
    entry: dict[str, Any] = {"code": code, "message": message}
    if detail is not None:
        entry["detail"] = detail
    body: dict[str, Any] = {"errors": [entry]}
    request_id = current_request_id()
    if request_id:
        body["request_id"] = request_id
    return body


def status_and_code(error: errors.RegistryError) -> tuple[int, str]:
    for cls in type(error).__mro__:
        if cls in ERROR_TABLE:
            return ERROR_TABLE[cls]
    return 500, "UNKNOWN"


def bearer_challenge(request: Request, error: errors.Unauthorized) -> str:
    """`Bearer realm=...,service=...[,scope=...][,error=...]` (the registry token flow)."""
    from peftreg.registry.api.deps import get_services, registry_service

    services = get_services(request)
    realm = services.settings.token_realm or f"{str(request.base_url).rstrip('/')}/token"
    service = registry_service(request, services)
    parts = [f'realm="{realm}"', f'service="{service}"']
    if error.access:
        parts.append(f'scope="{error.access}"')
    if error.insufficient_scope:
        parts.append('error="insufficient_scope"')
    return "Bearer " + ",".join(parts)


def error_response(error: errors.RegistryError, request: Request) -> JSONResponse:
    status, code = status_and_code(error)
    headers = None
    if isinstance(error, errors.Unauthorized):
        headers = {"WWW-Authenticate": bearer_challenge(request, error)}
    return JSONResponse(error_body(code, error.message, error.detail), status, headers=headers)


def allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at the request's path (for a 405's `Allow`)."""
    routes = request.app.router.routes
    return [
        method
        for method in HTTP_METHODS
        if any(
            route.matches({**request.scope, "method": method})[0] is Match.FULL for route in routes
        )
    ]


def _retry_later(message: str) -> JSONResponse:
    """503: nothing was done, and the same request may succeed in a moment."""
    return JSONResponse(error_body("UNAVAILABLE", message), 503, headers={"Retry-After": "1"})


def install_error_handlers(app: FastAPI) -> None:
    async def on_registry_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, errors.RegistryError)
        return error_response(exc, request)

    async def on_storage_unavailable(_request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(error_body("UNAVAILABLE", f"blob store unavailable: {exc}"), 503)

    async def on_validation(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(part) for part in first.get("loc", ()))
        # Where and why only: the rejected input itself may not be JSON (NaN, bytes).
        detail = [
            {"loc": list(error.get("loc", ())), "msg": error.get("msg"), "type": error.get("type")}
            for error in exc.errors()
        ]
        return JSONResponse(
            error_body("INVALID_REQUEST", f"{where}: {first.get('msg')}", detail), 400
        )

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        code = HTTP_CODES.get(exc.status_code, "UNKNOWN")
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = ", ".join(allowed_methods(request))
        return JSONResponse(error_body(code, str(exc.detail)), exc.status_code, headers=headers)

    async def on_unexpected(_request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error", exc_info=exc)
        return JSONResponse(error_body("UNKNOWN", "internal server error"), 500)

    async def on_database_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, DBAPIError)
        if isinstance(exc, DatabaseUnreachable):
            # Down, restarting or out of connections. The cause (it names hosts)
            # goes to the log, not to the client.
            logger.warning("database unreachable: %s", exc.orig)
            return _retry_later("database unavailable; retry the request")
        if not exc.connection_invalidated:
            return await on_unexpected(request, exc)
        # The database dropped the connection (a restart, a failover): the pool has
        # replaced its connections, and the request can be sent again as it is.
        return _retry_later("database connection lost; retry the request")

    async def on_pool_timeout(_request: Request, exc: Exception) -> JSONResponse:
        logger.warning("no database connection free: %s", exc)
        return _retry_later("server busy: no database connection free; retry the request")

    app.add_exception_handler(Exception, on_unexpected)
    app.add_exception_handler(errors.RegistryError, on_registry_error)
    app.add_exception_handler(StorageUnavailable, on_storage_unavailable)
    app.add_exception_handler(DBAPIError, on_database_error)
    app.add_exception_handler(PoolTimeout, on_pool_timeout)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
