"""Filesystem `BlobStore`: verified blobs appear by atomic rename.

Layout under the root directory::

    <root>/
      blobs/sha256/<hex[:2]>/<hex>      verified, content-addressed blobs
      uploads/<upload id>/data          bytes of an open upload session

An upload's bytes never live under `blobs/`: `commit_upload` hashes them,
fsyncs, and renames the data file to its final name in one `os.replace`,
so a crash at any point leaves either no blob or a complete one.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from client.digest import Digest, digest_file
from registry.storage.errors import (
    BlobNotFound,
    DigestMismatch,
    StorageUnavailable,
    UploadNotFound,
    UploadOffsetMismatch,
)
from registry.storage.hashing import RunningHashes
from registry.storage.upload_ids import check_upload_id, new_upload_id

READ_CHUNK = 1024 * 1024


def blob_path(root: Path, digest: Digest) -> Path:
    return root / "blobs" / digest.algorithm / digest.hex[:2] / digest.hex


def upload_dir(root: Path, upload_id: str) -> Path:
    return root / "uploads" / upload_id


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FilesystemUploadWriter:
    def __init__(self, store: FilesystemBlobStore, upload_id: str, offset: int) -> None:
        self._store = store
        self._upload_id = upload_id
        self._offset = offset
        self._size = offset
        self._file = (upload_dir(store.root, upload_id) / "data").open("r+b")
        self._file.seek(offset)
        self._hash = store.hashes.begin(upload_id, offset)

    def write(self, data: bytes) -> None:
        self._file.write(data)
        self._size += len(data)
        if self._hash is not None:
            self._hash.update(data)

    def close(self) -> int:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        if self._hash is not None:
            self._store.hashes.advance(self._upload_id, self._size, self._hash)
        return self._size

    def cancel(self) -> None:
        self._file.truncate(self._offset)
        self._file.close()
        self._store.hashes.forget(self._upload_id)


class FilesystemBlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.hashes = RunningHashes()
        (root / "blobs").mkdir(parents=True, exist_ok=True)
        (root / "uploads").mkdir(parents=True, exist_ok=True)

    # reading
    def stat(self, digest: Digest) -> int:
        try:
            return blob_path(self.root, digest).stat().st_size
        except FileNotFoundError:
            raise BlobNotFound(digest) from None

    def read(self, digest: Digest, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        try:
            handle = blob_path(self.root, digest).open("rb")
        except FileNotFoundError:
            raise BlobNotFound(digest) from None
        return self._read_from(handle, start, end)

    @staticmethod
    def _read_from(handle: BinaryIO, start: int, end: int | None) -> Iterator[bytes]:
        with handle:
            handle.seek(start)
            remaining = None if end is None else end - start
            while remaining is None or remaining > 0:
                size = READ_CHUNK if remaining is None else min(READ_CHUNK, remaining)
                chunk = handle.read(size)
                if not chunk:
                    return
                if remaining is not None:
                    remaining -= len(chunk)
                yield chunk

    def redirect_url(self, digest: Digest) -> str | None:
        return None

    # ingesting
    def create_upload(self) -> str:
        upload_id = new_upload_id()
        directory = upload_dir(self.root, upload_id)
        directory.mkdir(parents=True)
        (directory / "data").touch()
        return upload_id

    def upload_size(self, upload_id: str) -> int:
        path = upload_dir(self.root, check_upload_id(upload_id)) / "data"
        try:
            return path.stat().st_size
        except FileNotFoundError:
            raise UploadNotFound(upload_id) from None

    def open_writer(self, upload_id: str, offset: int) -> FilesystemUploadWriter:
        size = self.upload_size(upload_id)
        if offset != size:
            raise UploadOffsetMismatch(upload_id, size, offset)
        return FilesystemUploadWriter(self, upload_id, offset)

    def commit_upload(self, upload_id: str, digest: Digest) -> int:
        size = self.upload_size(upload_id)
        data = upload_dir(self.root, upload_id) / "data"
        known = self.hashes.take(upload_id, size) if digest.algorithm == "sha256" else None
        if known is not None:
            actual = Digest("sha256", known)
        else:
            actual, size = digest_file(data, digest.algorithm)
        if actual != digest:
            self.abort_upload(upload_id)
            raise DigestMismatch(digest, actual, size)
        target = blob_path(self.root, digest)
        if target.exists():
            self.abort_upload(upload_id)
            return size
        target.parent.mkdir(parents=True, exist_ok=True)
        with data.open("rb") as handle:
            os.fsync(handle.fileno())
        os.replace(data, target)
        _fsync_dir(target.parent)
        self.abort_upload(upload_id)
        return size

    def abort_upload(self, upload_id: str) -> None:
        self.hashes.forget(upload_id)
        try:
            checked = check_upload_id(upload_id)
        except UploadNotFound:
            return
        shutil.rmtree(upload_dir(self.root, checked), ignore_errors=True)

    def list_uploads(self) -> Iterator[tuple[str, datetime]]:
        for entry in (self.root / "uploads").iterdir():
            try:
                mtime = (entry / "data").stat().st_mtime
            except FileNotFoundError:
                mtime = entry.stat().st_mtime
            yield entry.name, datetime.fromtimestamp(mtime, UTC)

    # administration
    def delete(self, digest: Digest) -> None:
        try:
            blob_path(self.root, digest).unlink()
        except FileNotFoundError:
            raise BlobNotFound(digest) from None

    def list_digests(self) -> Iterator[Digest]:
        blobs = self.root / "blobs"
        for algorithm_dir in sorted(blobs.iterdir()):
            for prefix in sorted(algorithm_dir.iterdir()):
                for blob in sorted(prefix.iterdir()):
                    yield Digest(algorithm_dir.name, blob.name)

    def ping(self) -> None:
        probe = self.root / "uploads"
        if not (probe.is_dir() and os.access(probe, os.W_OK)):
            raise StorageUnavailable(f"{probe} is not a writable directory")
