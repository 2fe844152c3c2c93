"""Choose the blob store backend from settings, by an explicit mapping."""

from __future__ import annotations

from peftreg.registry.settings import Settings
from peftreg.registry.storage.base import BlobStore


def open_blob_store(settings: Settings) -> BlobStore:
    if settings.storage == "filesystem":
        from peftreg.registry.storage.filesystem import FilesystemBlobStore

        return FilesystemBlobStore(settings.resolved_storage_path())
    if settings.storage == "s3":
        from peftreg.registry.storage.s3 import S3BlobStore

        return S3BlobStore.from_settings(settings)
    raise ValueError(f"unknown storage backend {settings.storage!r}")
