"""Typed exceptions of the SDK, one per meaning of a registry error.

Every exception carries the human message, the OCI error code (when the
server sent one), the HTTP status and the request id to quote in a report.
"""

from __future__ import annotations

from typing import Any


class PeftregError(Exception):
    """Base class of every error the SDK raises."""

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        status: int | None = None,
        request_id: str | None = None,
        detail: Any = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status
        self.request_id = request_id
        self.detail = detail

    def __str__(self) -> str:
        if self.request_id:
            return f"{self.message} (request id {self.request_id})"
        return self.message


class TransportError(PeftregError):
    """The registry could not be reached, or the connection broke."""


class InvalidRequest(PeftregError):
    """The registry refused the request as malformed (400)."""


class InvalidReferenceError(InvalidRequest):
    """A repository reference, name or digest that does not parse."""


class RangeNotSatisfiable(InvalidRequest):
    """A byte range or upload offset the server does not hold (416)."""

    @property
    def offset(self) -> int | None:
        """The server's current upload size, when it said so."""
        if isinstance(self.detail, dict) and isinstance(self.detail.get("offset"), int):
            return int(self.detail["offset"])
        return None


class TooLarge(InvalidRequest):
    """The request body is over a server limit (413)."""


class DigestMismatch(PeftregError):
    """Content whose digest or size is not the one expected."""


class Unauthorized(PeftregError):
    """No credentials or wrong credentials (401)."""


class Forbidden(PeftregError):
    """The credentials do not allow this (403)."""


class NotFound(PeftregError):
    """Repository, manifest, blob, upload or token unknown (404)."""


class Conflict(PeftregError):
    """Refused because of the current state: immutable tag, version in use (409)."""


class ServerError(PeftregError):
    """The registry failed or is unavailable (5xx)."""


class CacheMiss(NotFound):
    """Offline mode: a manifest, reference or blob is not in the local cache."""


class UnsafePath(PeftregError):
    """A layer title that would write outside the output directory."""


CODE_TO_ERROR: dict[str, type[PeftregError]] = {
    "NAME_INVALID": InvalidReferenceError,
    "TAG_INVALID": InvalidReferenceError,
    "DIGEST_INVALID": DigestMismatch,
    "SIZE_INVALID": DigestMismatch,
    "NAME_UNKNOWN": NotFound,
    "BLOB_UNKNOWN": NotFound,
    "BLOB_UPLOAD_UNKNOWN": NotFound,
    "MANIFEST_UNKNOWN": NotFound,
    "TOKEN_UNKNOWN": NotFound,
    "NOT_FOUND": NotFound,
    "RANGE_INVALID": RangeNotSatisfiable,
    "MANIFEST_TOO_LARGE": TooLarge,
    "TAG_IMMUTABLE": Conflict,
    "VERSION_IN_USE": Conflict,
    "UNAUTHORIZED": Unauthorized,
    "DENIED": Forbidden,
    "LAYER_TITLE_INVALID": UnsafePath,
    "UNAVAILABLE": ServerError,
}

STATUS_TO_ERROR: dict[int, type[PeftregError]] = {
    400: InvalidRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: TooLarge,
    416: RangeNotSatisfiable,
}


def error_class(code: str | None, status: int) -> type[PeftregError]:
    """The exception class for an OCI error code, falling back to the HTTP status."""
    if code is not None and code in CODE_TO_ERROR:
        return CODE_TO_ERROR[code]
    if status in STATUS_TO_ERROR:
        return STATUS_TO_ERROR[status]
    if status >= 500:
        return ServerError
    if status == 400 or 400 <= status < 500:
        return InvalidRequest
    return PeftregError
