"""Errors raised by every `BlobStore` backend; the catalog translates them."""

from __future__ import annotations

from peftreg.digest import Digest


class StorageError(Exception):
    """Base class of storage-layer failures."""


class BlobNotFound(StorageError):
    def __init__(self, digest: Digest) -> None:
        super().__init__(f"blob {digest} is not in the store")
        self.digest = digest


class UploadNotFound(StorageError):
    def __init__(self, upload_id: str) -> None:
        super().__init__(f"upload {upload_id} does not exist")
        self.upload_id = upload_id


class UploadOffsetMismatch(StorageError):
    """A chunk does not start where the upload currently ends."""

    def __init__(self, upload_id: str, expected: int, given: int) -> None:
        super().__init__(f"upload {upload_id} is at offset {expected}, chunk starts at {given}")
        self.upload_id = upload_id
        self.expected = expected
        self.given = given


class UploadBusy(StorageError):
    """Another request is writing or committing this upload session right now."""

    def __init__(self, upload_id: str) -> None:
        super().__init__(f"upload {upload_id} is being written by another request")
        self.upload_id = upload_id


class DigestMismatch(StorageError):
    """Uploaded bytes do not hash to the digest the client declared."""

    def __init__(self, expected: Digest, actual: Digest, size: int) -> None:
        super().__init__(f"content hashes to {actual} ({size} bytes), not {expected}")
        self.expected = expected
        self.actual = actual
        self.size = size


class StorageUnavailable(StorageError):
    """The backend cannot be reached (readiness fails on this)."""
