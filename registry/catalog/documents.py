"""Small documents stored as blobs (config JSON, a README), read whole under a size limit."""

from __future__ import annotations

import json
from typing import Any

from peftreg.digest import Digest
from peftreg.registry.storage.base import BlobReader
from peftreg.registry.storage.errors import BlobNotFound

MAX_DOCUMENT_BYTES = 1024 * 1024


def read_small_blob(
    store: BlobReader, digest: str, limit: int = MAX_DOCUMENT_BYTES
) -> bytes | None:
    """The blob's bytes, or None when it is missing, malformed or larger than `limit`."""
    try:
        parsed = Digest.parse(digest)
        if store.stat(parsed) > limit:
            return None
        return b"".join(store.read(parsed))
    except (BlobNotFound, ValueError):
        return None


def read_json_blob(store: BlobReader, digest: str | None) -> Any:
    if digest is None:
        return None
    data = read_small_blob(store, digest)
    if data is None:
        return None
    try:
        return json.loads(data)
    except ValueError:
        return None
