"""Filesystem `BlobStore`: verified blobs appear by atomic rename.

Layout under the root directory::

    <root>/
      blobs/sha256/<hex[:2]>/<hex>      verified, content-addressed blobs
      uploads/<upload id>/data          bytes of an open upload session

An upload's bytes never live under `blobs/`: they are hashed as they are
written, and `commit_upload` fsyncs once and renames the data file to its
final name in one `os.replace`, so a crash at any point leaves either no
blob or a complete one. Appends are not fsynced one by one: a session's
bytes matter only once committed, and after a machine crash a client asks
for the session's offset and resumes from what the disk kept.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from peftreg.digest import Digest, InvalidDigest, digest_stream
from peftreg.following_hash import FollowingHash
from peftreg.registry.storage.errors import (
    BlobNotFound,
    DigestMismatch,
    StorageUnavailable,
    UploadBusy,
    UploadNotFound,
    UploadOffsetMismatch,
)
from peftreg.registry.storage.hashing import RunningHashes
from peftreg.registry.storage.session_blob import SessionBlobWriter
from peftreg.registry.storage.upload_ids import check_upload_id, new_upload_id
from peftreg.writeback import EarlyWriteback

READ_CHUNK = 4 * 1024 * 1024  # serving reads: fewer thread hops per GiB
HASH_DEPTH = 2  # write batches (of about 4 MiB, oci_uploads.WRITE_BUFFER) the hash may lag
IOV_MAX = os.sysconf("SC_IOV_MAX")  # buffers one writev takes
logger = logging.getLogger(__name__)


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


def _lock_session(handle: BinaryIO, upload_id: str) -> None:
    """Take the session's exclusive lock (across processes) or raise `UploadBusy`.

    One writer or committer at a time: otherwise two requests appending at
    the same offset, or a commit racing an append, could publish bytes that
    do not hash to the digest that was checked.
    """
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise UploadBusy(upload_id) from None


def _open_session(root: Path, upload_id: str, mode: str) -> BinaryIO:
    try:
        handle = (upload_dir(root, upload_id) / "data").open(mode)
    except FileNotFoundError:
        raise UploadNotFound(upload_id) from None
    _lock_session(handle, upload_id)  # type: ignore[arg-type]
    return handle  # type: ignore[return-value]


def _entries(directory: Path) -> list[Path]:
    """A directory's entries, sorted; none (logged) for a stray file where one belongs."""
    if not directory.is_dir():
        logger.warning("skipping %s: not a blob of this store", directory)
        return []
    return sorted(directory.iterdir())


def _blob_digest(algorithm: str, prefix: str, path: Path) -> Digest | None:
    """The digest a path under `blobs/` stores, or None (logged) for a stray entry."""
    try:
        digest = Digest.parse(f"{algorithm}:{path.name}")
    except InvalidDigest:
        digest = None
    if digest is None or digest.hex[:2] != prefix or not path.is_file():
        logger.warning("skipping %s: not a blob of this store", path)
        return None
    return digest


def _write_all(fd: int, chunks: Sequence[bytes]) -> None:
    """Write every byte of `chunks` at the file's position (`writev` may write fewer)."""
    pending = [memoryview(chunk) for chunk in chunks if chunk]
    while pending:
        written = os.writev(fd, pending[:IOV_MAX])
        while pending and written >= len(pending[0]):
            written -= len(pending.pop(0))
        if written:
            pending[0] = pending[0][written:]


class FilesystemUploadWriter:
    def __init__(self, store: FilesystemBlobStore, upload_id: str, offset: int) -> None:
        self._store = store
        self._upload_id = upload_id
        self._file = _open_session(store.root, upload_id, "r+b")
        size = os.fstat(self._file.fileno()).st_size  # checked under the lock
        if offset != size:
            self._file.close()
            raise UploadOffsetMismatch(upload_id, size, offset)
        self._offset = offset
        self._size = offset
        self._file.seek(offset)
        # Hashed on its own thread while the next batch is written (peftreg.following_hash).
        state = store.hashes.begin(upload_id, offset)
        self._hash = None if state is None else FollowingHash(state, HASH_DEPTH)
        self._writeback = EarlyWriteback(self._file.fileno(), offset)

    def write(self, data: bytes) -> None:
        self.write_many((data,))

    def write_many(self, chunks: Sequence[bytes]) -> None:
        """One `writev` for the chunks as they arrived: they are never joined (copied)."""
        _write_all(self._file.fileno(), chunks)
        if self._hash is not None:
            self._hash.update_many(chunks)
        self._size += sum(len(chunk) for chunk in chunks)
        self._writeback.written(self._size)

    def local_fd(self) -> int:
        return self._file.fileno()

    def appended(self, nbytes: int) -> None:
        """Bytes the kernel put in the file: hashed by reading them back from the page cache."""
        if self._hash is not None:
            self._hash.update_file(self._file.fileno(), self._size, self._size + nbytes)
        self._size += nbytes
        self._writeback.written(self._size)

    def close(self) -> int:
        try:
            state = None if self._hash is None else self._hash.finish()  # it may read the file
        except OSError:
            self._store.hashes.forget(self._upload_id)  # the commit hashes what the disk holds
            state = None
        finally:
            self._file.close()  # durable at the commit: one fsync per blob, not per request
        if state is not None:
            self._store.hashes.advance(self._upload_id, self._offset, self._size, state)
        return self._size

    def cancel(self) -> None:
        if self._hash is not None:
            with contextlib.suppress(OSError):  # what it hashed is dropped anyway
                self._hash.finish()
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
        return self._read_from(self.local_file(digest), start, end)

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

    def local_file(self, digest: Digest) -> BinaryIO:
        try:
            return blob_path(self.root, digest).open("rb")
        except FileNotFoundError:
            raise BlobNotFound(digest) from None

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
        return FilesystemUploadWriter(self, check_upload_id(upload_id), offset)

    def open_blob(self, digest: Digest) -> SessionBlobWriter:
        """Through a session: its commit is an fsync and a rename, as a direct write's."""
        return SessionBlobWriter(self, digest)

    def commit_upload(self, upload_id: str, digest: Digest) -> int:
        checked = check_upload_id(upload_id)
        with _open_session(self.root, checked, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            known = self.hashes.take(checked, size) if digest.algorithm == "sha256" else None
            if known is not None:
                actual = Digest("sha256", known)
            else:
                actual, size = digest_stream(handle, digest.algorithm)
            if actual != digest:
                self._discard(checked)
                raise DigestMismatch(digest, actual, size)
            target = blob_path(self.root, digest)
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                os.fsync(handle.fileno())
                os.replace(upload_dir(self.root, checked) / "data", target)
                _fsync_dir(target.parent)
        self._discard(checked)
        return size

    def abort_upload(self, upload_id: str) -> None:
        try:
            checked = check_upload_id(upload_id)
            handle = _open_session(self.root, checked, "rb")
        except UploadNotFound:
            self._discard(upload_id)
            return
        with handle:
            self._discard(checked)

    def _discard(self, upload_id: str) -> None:
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
                try:
                    mtime = entry.stat().st_mtime
                except FileNotFoundError:
                    continue  # committed or aborted while we listed
            yield entry.name, datetime.fromtimestamp(mtime, UTC)

    # administration
    def delete(self, digest: Digest) -> None:
        try:
            blob_path(self.root, digest).unlink()
        except FileNotFoundError:
            raise BlobNotFound(digest) from None

    def abort_blob_writes(self, started_before: datetime, *, dry_run: bool = False) -> int:
        return 0  # blob writers are sessions: `list_uploads` reports theirs

    def list_digests(self) -> Iterator[Digest]:
        """Every blob file; anything else under `blobs/` is skipped with a warning.

        Only a file at `<algorithm>/<hex[:2]>/<hex>` with a valid digest is a
        blob: an editor's backup or a stray file there is not ours to report
        (or, by garbage collection, to delete).
        """
        blobs = self.root / "blobs"
        for algorithm_dir in _entries(blobs):
            for prefix in _entries(algorithm_dir):
                for blob in _entries(prefix):
                    digest = _blob_digest(algorithm_dir.name, prefix.name, blob)
                    if digest is not None:
                        yield digest

    def ping(self) -> None:
        probe = self.root / "uploads"
        if not (probe.is_dir() and os.access(probe, os.W_OK)):
            raise StorageUnavailable(f"{probe} is not a writable directory")
