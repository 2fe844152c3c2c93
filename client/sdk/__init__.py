"""The peftreg Python SDK: `Client`, its models and its typed errors.

`Client` is imported lazily: the cache and transfer modules import the
errors from here, and the client imports them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from peftreg.sdk.errors import (
    CacheMiss,
    Conflict,
    DigestMismatch,
    Forbidden,
    InvalidReferenceError,
    InvalidRequest,
    NotFound,
    PeftregError,
    RangeNotSatisfiable,
    ServerError,
    TooLarge,
    TransportError,
    Unauthorized,
    UnsafePath,
)

if TYPE_CHECKING:
    from peftreg.sdk.client import DEFAULT_URL, Client

__all__ = [
    "DEFAULT_URL",
    "CacheMiss",
    "Client",
    "Conflict",
    "DigestMismatch",
    "Forbidden",
    "InvalidReferenceError",
    "InvalidRequest",
    "NotFound",
    "PeftregError",
    "RangeNotSatisfiable",
    "ServerError",
    "TooLarge",
    "TransportError",
    "Unauthorized",
    "UnsafePath",
]


def __getattr__(name: str) -> Any:
    if name in ("Client", "DEFAULT_URL"):
        from peftreg.sdk import client

        return getattr(client, name)
    raise AttributeError(f"module 'peftreg.sdk' has no attribute {name!r}")
