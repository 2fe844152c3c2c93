"""The OpenAPI document, true to the service.

Routes declare their success statuses and the domain errors they raise
(`failures(...)`); the statuses and OCI codes of those errors come from the
one table (`peftreg.registry.api.errors.ERROR_TABLE`), each with the OCI
error body. `openapi_document` then adds what holds for every route: request
validation answers 400 `INVALID_REQUEST` (never 422); authenticated routes
answer 401 `UNAUTHORIZED` and 403 `DENIED` and carry the bearer and basic
security schemes (optional where this configuration lets anonymous callers
in); path parameters carry the patterns of names, tags and digests; and the
query parameters and bodies that routes read from the raw request.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, Field

from peftreg.digest import DIGEST_PATTERN
from peftreg.manifest import MANIFEST_MEDIA_TYPES, OCI_INDEX
from peftreg.names import MAX_REPOSITORY_LENGTH, REPOSITORY_PATTERN, TAG_PATTERN
from peftreg.registry import errors
from peftreg.registry.api.errors import ERROR_TABLE, HTTP_CODES
from peftreg.registry.settings import Settings

OCTET_STREAM = "application/octet-stream"
# Served to anyone: probes, metrics, the published schemas, and the token endpoint
# (which takes credentials but also answers without them, with a token granting nothing).
UNAUTHENTICATED = ("/healthz", "/readyz", "/metrics", "/schemas/{name}", "/token")
NAME_SCHEMA = {
    "type": "string",
    "pattern": f"^{REPOSITORY_PATTERN}$",
    "maxLength": MAX_REPOSITORY_LENGTH,
}
TAG_SCHEMA = {"type": "string", "pattern": f"^{TAG_PATTERN}$"}
DIGEST_SCHEMA = {"type": "string", "pattern": f"^(?:{DIGEST_PATTERN})$"}
REFERENCE_SCHEMA = {"type": "string", "pattern": f"^(?:{TAG_PATTERN}|{DIGEST_PATTERN})$"}
UPLOAD_ID_SCHEMA = {
    "type": "string",
    "format": "uuid",
    "pattern": "^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$",
}
PATH_SCHEMAS: dict[str, dict[str, Any]] = {
    "name": NAME_SCHEMA,
    "tag": TAG_SCHEMA,
    "digest": DIGEST_SCHEMA,
    "reference": REFERENCE_SCHEMA,
    "upload_id": UPLOAD_ID_SCHEMA,
}
# Query parameters whose grammar the routes check themselves (answering 400 INVALID_REQUEST).
QUERY_SCHEMAS: dict[str, dict[str, Any]] = {
    "annotation": {"type": "array", "items": {"type": "string", "pattern": "^[^=]+="}},
    "cursor": {"type": "string", "pattern": "^[A-Za-z0-9_-]*$"},
    "digest": {"type": "string", "pattern": f"^(?:{DIGEST_PATTERN})?$"},  # empty: "none"
}
assert NAME_SCHEMA["maxLength"] == MAX_REPOSITORY_LENGTH


class ErrorEntry(BaseModel):
    code: str = Field(description="OCI error code, e.g. NAME_UNKNOWN")
    message: str
    detail: Any = None


class ErrorBody(BaseModel):
    """The OCI error shape, on every route."""

    errors: list[ErrorEntry]
    request_id: str | None = Field(default=None, description="Quote it in a report")


def failures(*raised: type[errors.RegistryError]) -> dict[int | str, dict[str, Any]]:
    """`responses=` for the domain errors a route raises: their statuses and OCI codes
    from the one table, each with the error body."""
    codes: dict[int, set[str]] = {}
    for error in raised:
        status, code = ERROR_TABLE[error]
        codes.setdefault(status, set()).add(code)
    return {status: _error_response(found) for status, found in sorted(codes.items())}


def _error_response(codes: set[str]) -> dict[str, Any]:
    return {"model": ErrorBody, "description": "OCI error: " + ", ".join(sorted(codes))}


def no_body(description: str, **headers: str) -> dict[str, Any]:
    """A success response without a body, with the headers it always carries."""
    response: dict[str, Any] = {"description": description}
    if headers:
        response["headers"] = {
            name: {"description": text, "required": True, "schema": {"type": "string"}}
            for name, text in headers.items()
        }
    return response


def body(description: str, media_types: tuple[str, ...], schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "description": description,
        "content": {media_type: {"schema": schema} for media_type in media_types},
    }


UPLOAD_PROGRESS = no_body(
    "Upload session open: where to send the next chunk and what it holds",
    Location="The session's URL",
    Range="Bytes received, as 0-<last>",
)
CREATED_BLOB = no_body("Blob stored", Location="The blob's URL", **{"Docker-Content-Digest": ""})
MANIFEST_SCHEMA = {
    "type": "object",
    "required": ["schemaVersion"],
    "properties": {"schemaVersion": {"const": 2}, "mediaType": {"type": "string"}},
}
OCI_INDEX_SCHEMA = {
    "type": "object",
    "required": ["schemaVersion", "mediaType", "manifests"],
    "properties": {
        "schemaVersion": {"const": 2},
        "mediaType": {"const": OCI_INDEX},
        "manifests": {"type": "array", "items": {"type": "object"}},
    },
}
MANIFEST_BODY = body("The manifest's exact bytes", MANIFEST_MEDIA_TYPES, MANIFEST_SCHEMA)
BLOB_BYTES = body("The blob's bytes", (OCTET_STREAM,), {"type": "string", "format": "binary"})

# Parameters and bodies that routes read from the raw request (to keep the OCI
# error codes of their checks), by (path, method).
EXTRA_PARAMETERS: dict[tuple[str, str], list[dict[str, Any]]] = {
    ("/v2/{name}/blobs/uploads/", "post"): [
        {"name": "digest", "in": "query", "schema": DIGEST_SCHEMA},
        {"name": "mount", "in": "query", "schema": DIGEST_SCHEMA},
        {"name": "from", "in": "query", "schema": NAME_SCHEMA},
    ],
    ("/v2/{name}/blobs/uploads/{upload_id}", "put"): [
        {"name": "digest", "in": "query", "required": True, "schema": DIGEST_SCHEMA},
    ],
    ("/v2/{name}/manifests/{reference}", "put"): [
        {
            "name": "tag",
            "in": "query",
            "schema": {"type": "array", "items": TAG_SCHEMA},
            "style": "form",
            "explode": True,
        },
    ],
}
BLOB_CHUNK = {"content": {OCTET_STREAM: {"schema": {"type": "string", "format": "binary"}}}}
EXTRA_BODIES: dict[tuple[str, str], dict[str, Any]] = {
    ("/v2/{name}/blobs/uploads/", "post"): BLOB_CHUNK,
    ("/v2/{name}/blobs/uploads/{upload_id}", "patch"): BLOB_CHUNK,
    ("/v2/{name}/blobs/uploads/{upload_id}", "put"): BLOB_CHUNK,
    ("/v2/{name}/manifests/{reference}", "put"): {
        "required": True,
        "content": {media_type: {"schema": MANIFEST_SCHEMA} for media_type in MANIFEST_MEDIA_TYPES},
    },
}


def openapi_document(app: FastAPI, settings: Settings) -> dict[str, Any]:
    """The document for this app in this configuration (cached on the app)."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    document = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    components = document.setdefault("components", {})
    components["securitySchemes"] = {
        "bearer": {"type": "http", "scheme": "bearer", "description": "A registry token"},
        "basic": {
            "type": "http",
            "scheme": "basic",
            "description": "Any user, the token as password",
        },
    }
    security: list[dict[str, list[str]]] = [{"bearer": []}, {"basic": []}]
    if settings.anonymous_scope() != "none":
        security.append({})  # anonymous callers get this configuration's anonymous grants
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            _complete(path, method, operation, security)
    app.openapi_schema = document
    return document


def _complete(
    path: str, method: str, operation: dict[str, Any], security: list[dict[str, list[str]]]
) -> None:
    responses: dict[str, Any] = operation.setdefault("responses", {})
    if responses.get("422", {}).get("description") == "Validation Error":
        del responses["422"]  # FastAPI's: validation errors are answered with 400
    parameters: list[dict[str, Any]] = operation.setdefault("parameters", [])
    if (path, method) in EXTRA_BODIES:
        operation["requestBody"] = EXTRA_BODIES[(path, method)]
    for parameter in parameters:
        if parameter["in"] == "path" and parameter["name"] in PATH_SCHEMAS:
            parameter["schema"] = PATH_SCHEMAS[parameter["name"]]
        elif parameter["in"] == "query" and parameter["name"] in QUERY_SCHEMAS:
            parameter["schema"] = QUERY_SCHEMAS[parameter["name"]]
    parameters.extend(EXTRA_PARAMETERS.get((path, method), []))
    if not parameters:
        operation.pop("parameters")
    extra: dict[int, set[str]] = {}
    if parameters or "requestBody" in operation:
        extra[400] = {HTTP_CODES[400]}
    if path in UNAUTHENTICATED:
        operation["security"] = []
    else:
        operation["security"] = security
        extra[401] = {ERROR_TABLE[errors.Unauthorized][1]}
        extra[403] = {ERROR_TABLE[errors.Denied][1]}
    for status, codes in extra.items():
        documented = responses.get(str(status))
        if documented is None:
            responses[str(status)] = {
                "description": "OCI error: " + ", ".join(sorted(codes)),
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}
                },
            }
        else:
            listed = documented["description"].removeprefix("OCI error: ").split(", ")
            documented["description"] = "OCI error: " + ", ".join(sorted({*listed, *codes}))
