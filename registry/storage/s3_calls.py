"""botocore failures turned into storage errors, and the `Content-MD5` of a body."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterator
from contextlib import contextmanager

from botocore.exceptions import (
    ClientError,
    ConnectionError,
    HTTPClientError,
    NoCredentialsError,
    PartialCredentialsError,
)

from peftreg.registry.storage.errors import StorageError, StorageUnavailable

MISSING_CODES = frozenset({"404", "NoSuchKey", "NotFound"})
UNAVAILABLE_CODES = frozenset(
    {
        "NoSuchBucket",
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "SlowDown",
        "ServiceUnavailable",
        "InternalError",
        "RequestTimeout",
    }
)
CONNECTION_ERRORS = (ConnectionError, HTTPClientError, NoCredentialsError, PartialCredentialsError)


def content_md5(data: bytes | bytearray | memoryview) -> str:
    return base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()


def error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def is_missing(exc: ClientError) -> bool:
    return error_code(exc) in MISSING_CODES


def _translate(exc: ClientError) -> StorageError:
    code = error_code(exc)
    if code in UNAVAILABLE_CODES or _status(exc) >= 500:
        return StorageUnavailable(f"S3 request failed: {exc}")
    return StorageError(f"S3 request failed: {exc}")


@contextmanager
def s3_errors(missing: StorageError | None = None) -> Iterator[None]:
    """Turn botocore failures into storage errors.

    A 404 for a key becomes `missing` when given; unreachable endpoints,
    missing credentials, a missing bucket and server errors become
    `StorageUnavailable`; other client errors a plain `StorageError`.
    """
    try:
        yield
    except ClientError as exc:
        if missing is not None and is_missing(exc):
            raise missing from None
        raise _translate(exc) from exc
    except CONNECTION_ERRORS as exc:
        raise StorageUnavailable(f"S3 endpoint unavailable: {exc}") from exc
