"""Upload session ids: random UUIDs, accepted only in their canonical spelling."""

from __future__ import annotations

import uuid

from peftreg.registry.storage.errors import UploadNotFound


def new_upload_id() -> str:
    return str(uuid.uuid4())


def check_upload_id(upload_id: str) -> str:
    """The id if it is a canonical UUID, else `UploadNotFound` (no path tricks)."""
    try:
        canonical = str(uuid.UUID(upload_id))
    except ValueError:
        raise UploadNotFound(upload_id) from None
    if canonical != upload_id:
        raise UploadNotFound(upload_id)
    return canonical
