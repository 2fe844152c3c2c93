"""A blob of known digest written straight to its content-addressed S3 key.

A session's bytes reach `blobs/` by a server-side copy at its commit (see
`s3`), which the store performs at its own disk speed: for 1 GiB on
SeaweedFS, a quarter of the push. When the digest comes before the bytes (a
monolithic upload, a job's output), they can go to the blob's key at once:
parts of a multipart upload there, hashed as they stream, completed by
`publish` only if they hash to the digest. An unfinished multipart upload is
invisible, so nothing unverified is ever listed or read under `blobs/`; one
never completed is aborted by `cancel`, or by the bucket's lifecycle rule
after a crash. A blob smaller than one part is sent in one PUT at `publish`.

Parts start at the store's part size and double every tenth of `max_parts`
parts, so a blob of unknown length fits S3's 10,000 parts up to terabytes,
while memory stays a few parts of the size reached.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from peftreg.digest import Digest
from peftreg.registry.storage.errors import DigestMismatch

if TYPE_CHECKING:
    from peftreg.registry.storage.s3 import S3BlobStore
    from peftreg.registry.storage.s3_multipart import MultipartUpload

MAX_PART_SIZE = 5 * 1024**3  # S3's largest part


class S3BlobWriter:
    def __init__(self, store: S3BlobStore, digest: Digest) -> None:
        self._store = store
        self._digest = digest
        self._key = store.layout.blob(digest)
        self._hash = digest.hasher()
        self._size = 0
        self._buffer = bytearray()
        self._multipart: MultipartUpload | None = None
        self._done = False

    def write(self, data: bytes) -> None:
        if not data:
            return
        self._hash.update(data)
        self._size += len(data)
        self._buffer += data
        while len(self._buffer) >= (part := self._part_size()):
            with memoryview(self._buffer) as view:
                head = bytes(view[:part])  # one copy (a slice of the bytearray would be two)
            del self._buffer[:part]
            if self._multipart is None:
                self._multipart = self._store.start_multipart(self._key)
            self._multipart.send(head)

    def write_many(self, chunks: Sequence[bytes]) -> None:
        for chunk in chunks:  # the part buffer joins them anyway
            self.write(chunk)

    def local_fd(self) -> None:
        return None  # the bytes go to the object store

    def appended(self, nbytes: int) -> None:
        raise RuntimeError("an S3 blob writer has no local file to append to")

    def close(self) -> int:
        if self._multipart is not None and self._buffer:
            self._multipart.send(bytes(self._buffer))  # the last part may be short
            self._buffer.clear()
        return self._size

    def publish(self) -> int:
        self.close()
        actual = Digest(self._digest.algorithm, self._hash.hexdigest())
        if actual != self._digest:
            self.cancel()
            raise DigestMismatch(self._digest, actual, self._size)
        try:
            if self._store.exists(self._key):
                self.cancel()  # stored already, by someone else: the same bytes
            elif self._multipart is not None:
                self._multipart.complete()
            else:
                self._store.put(self._key, bytes(self._buffer))
        except BaseException:
            self.cancel()
            raise
        self._done = True
        return self._size

    def cancel(self) -> None:
        if self._done:
            return
        self._done = True
        self._buffer.clear()
        if self._multipart is not None:
            self._multipart.abort()

    def _part_size(self) -> int:
        """The next part's size: the store's, doubled every tenth of its part limit."""
        sent = 0 if self._multipart is None else self._multipart.parts
        doublings = sent * 10 // self._store.max_parts
        return min(MAX_PART_SIZE, self._store.part_size << doublings)
