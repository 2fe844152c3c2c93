"""Appending to an S3 upload session: each writer stores its bytes as one new segment.

Bytes are hashed as they arrive and sent as multipart parts of `part_size`
while the request streams (a single PUT when fewer arrive), so a commit
never reads them back. S3 wants every part but the last to be at least
5 MiB: a writer that appends after a shorter last segment (a small PATCH)
reads that one back, bounded by the minimum, and writes it again at the
head of its own segment, which replaces it. A segment reaching `max_parts`
parts is completed and the writer goes on in a fresh one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from peftreg.registry.storage.errors import UploadNotFound
from peftreg.registry.storage.s3_layout import Segment

if TYPE_CHECKING:
    import hashlib

    from peftreg.registry.storage.s3 import S3BlobStore
    from peftreg.registry.storage.s3_multipart import MultipartUpload


class S3UploadWriter:
    def __init__(
        self, store: S3BlobStore, upload_id: str, offset: int, segments: list[Segment]
    ) -> None:
        self._store = store
        self._upload_id = upload_id
        self._size = offset
        self._layout = [s.key for s in segments]  # the session's segments as this writer ends
        self._hash_start = offset
        self._hash: hashlib._Hash | None = store.hashes.begin(
            upload_id, offset, tuple(self._layout)
        )
        short = segments[-1] if segments else None
        self._short = short if short is not None and short.size < store.min_part_size else None
        self._replaced: Segment | None = None
        self._segment_start = offset
        self._segment_sent = 0  # bytes of the current segment already in parts
        self._multipart: MultipartUpload | None = None
        self._buffer = bytearray()
        self._written: list[str] = []

    def write_many(self, chunks: Sequence[bytes]) -> None:
        for chunk in chunks:  # the part buffer joins them anyway
            self.write(chunk)

    def local_fd(self) -> None:
        return None  # the session lives in the object store

    def appended(self, nbytes: int) -> None:
        raise RuntimeError("an S3 upload session has no local file to append to")

    def write(self, data: bytes) -> None:
        if not data:
            return
        if self._short is not None:
            self._take_over(self._short)
            self._short = None
        self._size += len(data)
        if self._hash is not None:
            self._hash.update(data)
        self._buffer += data
        part = self._store.part_size
        while len(self._buffer) >= part:
            with memoryview(self._buffer) as view:
                head = bytes(view[:part])  # one copy (a slice of the bytearray would be two)
            del self._buffer[:part]
            self._send(head)
            if self._multipart is not None and self._multipart.parts >= self._store.max_parts:
                self._finish_segment(with_buffer=False)

    def close(self) -> int:
        try:
            self._finish_segment(with_buffer=True)
        except BaseException:
            self.cancel()
            raise
        if self._replaced is not None:
            # The new segment starts where the short one did and is longer, so
            # it already wins over it; removing the old one is housekeeping.
            self._store.delete_keys([self._replaced.key])
        if self._hash is not None:
            self._store.hashes.advance(
                self._upload_id, self._hash_start, self._size, self._hash, tuple(self._layout)
            )
        return self._size

    def cancel(self) -> None:
        self._buffer.clear()
        if self._multipart is not None:
            self._multipart.abort()
            self._multipart = None
        self._store.hashes.forget(self._upload_id)
        self._store.delete_keys(self._written)
        self._written.clear()

    def _take_over(self, short: Segment) -> None:
        """Start this writer's segment with the bytes of the session's short last one."""
        data = self._store.get_bytes(short.key, UploadNotFound(self._upload_id))
        if len(data) != short.size:
            raise UploadNotFound(self._upload_id)  # replaced meanwhile by another writer
        self._buffer += data
        self._segment_start = short.offset
        self._replaced = short
        self._layout.pop()
        if self._hash is None and short.offset == 0:
            # Every byte of the session passes through here: hash them afresh.
            self._hash = self._store.hashes.begin(self._upload_id, 0, ())
            self._hash_start = 0
            if self._hash is not None:
                self._hash.update(data)

    def _send(self, part: bytes) -> None:
        if self._multipart is None:
            key = self._store.layout.segment(self._upload_id, self._segment_start)
            self._multipart = self._store.start_multipart(key)
        self._multipart.send(part)
        self._segment_sent += len(part)

    def _finish_segment(self, *, with_buffer: bool) -> None:
        """Complete the current segment: with what is buffered (at close), or without.

        Without the buffer (a segment full of parts, mid-write) the buffered
        bytes start the next segment. A writer that holds nothing stores nothing.
        """
        multipart = self._multipart
        if multipart is None:
            if not (with_buffer and self._buffer):
                return
            key = self._store.layout.segment(self._upload_id, self._segment_start)
            self._store.put(key, bytes(self._buffer))
            size = len(self._buffer)
        else:
            if with_buffer and self._buffer:
                self._send(bytes(self._buffer))
            multipart.complete()
            key, size = multipart.key, self._segment_sent
        if with_buffer:
            self._buffer.clear()
        self._multipart = None
        self._written.append(key)
        self._layout.append(key)
        self._segment_start += size
        self._segment_sent = 0
