"""`InstrumentedBlobStore`: any `BlobStore`, with each call timed into `Metrics`.

A decorator implementing the same protocol, so the backends stay free of
metrics code. Operations are labelled by method name (`stat`, `read`,
`commit_upload`, ...); `write` and `close` are the calls of upload writers.
`read` times opening the blob (the backend's request), not the client
draining it; listings time the calls that fetch each item.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from typing import BinaryIO, TypeVar

from peftreg.digest import Digest
from peftreg.registry.observability.metrics import Metrics
from peftreg.registry.storage.base import BlobStore, BlobWriter, UploadWriter

T = TypeVar("T")


class _Timer:
    def __init__(self, metrics: Metrics, backend: str) -> None:
        self.metrics = metrics
        self.backend = backend

    def call(self, operation: str, work: Callable[[], T]) -> T:
        started = time.perf_counter()
        try:
            return work()
        finally:
            self.metrics.observe_store(self.backend, operation, time.perf_counter() - started)

    def iterate(self, operation: str, items: Iterator[T]) -> Iterator[T]:
        """Yield from `items`, observing the time spent producing them once at the end."""
        spent = 0.0
        try:
            while True:
                started = time.perf_counter()
                try:
                    item = next(items)
                except StopIteration:
                    spent += time.perf_counter() - started
                    return
                spent += time.perf_counter() - started
                yield item
        finally:
            self.metrics.observe_store(self.backend, operation, spent)


class InstrumentedUploadWriter:
    def __init__(self, inner: UploadWriter, timer: _Timer) -> None:
        self.inner = inner
        self._timer = timer

    def write(self, data: bytes) -> None:
        self._timer.call("write", lambda: self.inner.write(data))

    def write_many(self, chunks: Sequence[bytes]) -> None:
        self._timer.call("write", lambda: self.inner.write_many(chunks))

    def local_fd(self) -> int | None:
        return self.inner.local_fd()

    def appended(self, nbytes: int) -> None:
        self._timer.call("write", lambda: self.inner.appended(nbytes))

    def close(self) -> int:
        return self._timer.call("close", self.inner.close)

    def cancel(self) -> None:
        self._timer.call("cancel", self.inner.cancel)


class InstrumentedBlobWriter(InstrumentedUploadWriter):
    def __init__(self, inner: BlobWriter, timer: _Timer) -> None:
        super().__init__(inner, timer)
        self.blob = inner

    def publish(self) -> int:
        return self._timer.call("publish", self.blob.publish)


class InstrumentedBlobStore:
    """Times every call of `inner` as `blob_store_seconds{backend, operation}`."""

    def __init__(self, inner: BlobStore, metrics: Metrics, backend: str) -> None:
        self.inner = inner
        self._timer = _Timer(metrics, backend)

    # reading
    def stat(self, digest: Digest) -> int:
        return self._timer.call("stat", lambda: self.inner.stat(digest))

    def read(self, digest: Digest, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        return self._timer.call("read", lambda: self.inner.read(digest, start, end))

    def redirect_url(self, digest: Digest) -> str | None:
        return self._timer.call("redirect_url", lambda: self.inner.redirect_url(digest))

    def local_file(self, digest: Digest) -> BinaryIO | None:
        return self._timer.call("local_file", lambda: self.inner.local_file(digest))

    # ingesting
    def create_upload(self) -> str:
        return self._timer.call("create_upload", self.inner.create_upload)

    def upload_size(self, upload_id: str) -> int:
        return self._timer.call("upload_size", lambda: self.inner.upload_size(upload_id))

    def open_writer(self, upload_id: str, offset: int) -> UploadWriter:
        writer = self._timer.call("open_writer", lambda: self.inner.open_writer(upload_id, offset))
        return InstrumentedUploadWriter(writer, self._timer)

    def commit_upload(self, upload_id: str, digest: Digest) -> int:
        return self._timer.call(
            "commit_upload", lambda: self.inner.commit_upload(upload_id, digest)
        )

    def open_blob(self, digest: Digest) -> BlobWriter:
        writer = self._timer.call("open_blob", lambda: self.inner.open_blob(digest))
        return InstrumentedBlobWriter(writer, self._timer)

    def abort_upload(self, upload_id: str) -> None:
        self._timer.call("abort_upload", lambda: self.inner.abort_upload(upload_id))

    def list_uploads(self) -> Iterator[tuple[str, datetime]]:
        return self._timer.iterate("list_uploads", self.inner.list_uploads())

    # administration
    def delete(self, digest: Digest) -> None:
        self._timer.call("delete", lambda: self.inner.delete(digest))

    def abort_blob_writes(self, started_before: datetime, *, dry_run: bool = False) -> int:
        return self._timer.call(
            "abort_blob_writes",
            lambda: self.inner.abort_blob_writes(started_before, dry_run=dry_run),
        )

    def list_digests(self) -> Iterator[Digest]:
        return self._timer.iterate("list_digests", self.inner.list_digests())

    def ping(self) -> None:
        self._timer.call("ping", self.inner.ping)
