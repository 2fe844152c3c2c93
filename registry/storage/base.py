"""The `BlobStore` protocol every backend implements.

Split by capability, as in distribution/distribution: reading, ingesting
(upload sessions) and administration (delete, listing, readiness). The
service only ever sees `BlobStore`; backends are chosen from settings by
`peftreg.registry.storage.factory.open_blob_store`.

Invariant shared by every backend and checked by the conformance suite in
`tests/storage/`: a blob is visible under its digest only after its bytes
were verified against that digest. An interrupted or mismatched upload
leaves nothing visible.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import BinaryIO, Protocol

from peftreg.digest import Digest


class UploadWriter(Protocol):
    """Appends bytes to an upload session from a given offset."""

    def write(self, data: bytes) -> None: ...

    def write_many(self, chunks: Sequence[bytes]) -> None:
        """Append the chunks in order, as `write` of their concatenation (without making it).

        The chunks are the store's until `close` or `cancel`: it may hash them after
        this returns, so the caller must not change them (bytes cannot change)."""
        ...

    def local_fd(self) -> int | None:
        """The open session file the next bytes go to, positioned at its end, for the
        kernel to write a request body into (then `appended`); None for a store that
        keeps no local files. The writer keeps it open until `close` or `cancel`."""
        ...

    def appended(self, nbytes: int) -> None:
        """`nbytes` more were written into `local_fd` at its end (by the kernel, not
        `write`): account and hash them. Only for a writer with a `local_fd`."""
        ...

    def close(self) -> int:
        """Make the written bytes durable; returns the upload's new size."""
        ...

    def cancel(self) -> None:
        """Drop what this writer wrote; the upload keeps its previous size."""
        ...


class BlobWriter(UploadWriter, Protocol):
    """Bytes of one blob whose digest is known before them (`BlobIngester.open_blob`).

    `close` says every byte was handed over (and returns the size); nothing is
    visible until `publish`. `cancel`, before or after `close`, drops it all.
    """

    def publish(self) -> int:
        """Verify the bytes hash to the digest and make the blob visible; returns its size.

        On `DigestMismatch` nothing becomes visible and the bytes are dropped.
        Publishing content that is already stored only drops the bytes.
        """
        ...


class BlobReader(Protocol):
    def stat(self, digest: Digest) -> int:
        """Size of a visible blob; raises `BlobNotFound`."""
        ...

    def read(self, digest: Digest, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """Bytes `[start, end)` of a blob (to the end when `end` is None).

        Raises `BlobNotFound` before yielding anything when the blob is absent.
        """
        ...

    def redirect_url(self, digest: Digest) -> str | None:
        """A URL clients may fetch the blob from directly, or None to proxy."""
        ...

    def local_file(self, digest: Digest) -> BinaryIO | None:
        """The blob as an open local file (the caller closes it), for the kernel to send
        as it is; raises `BlobNotFound`. A store that keeps no local files answers None
        for every digest, without looking it up."""
        ...


class BlobIngester(Protocol):
    def create_upload(self) -> str:
        """Start an upload session; returns its id."""
        ...

    def upload_size(self, upload_id: str) -> int:
        """Bytes received so far; raises `UploadNotFound`."""
        ...

    def open_writer(self, upload_id: str, offset: int) -> UploadWriter:
        """A writer appending at `offset`, which must equal the current size.

        Raises `UploadNotFound` or `UploadOffsetMismatch`.
        """
        ...

    def commit_upload(self, upload_id: str, digest: Digest) -> int:
        """Verify the upload hashes to `digest` and make it visible under it.

        Returns the blob size. On `DigestMismatch` the upload is discarded and
        nothing becomes visible. Committing content that is already stored is
        a no-op apart from discarding the upload.
        """
        ...

    def open_blob(self, digest: Digest) -> BlobWriter:
        """A writer for the blob `digest`, whose bytes follow (a monolithic upload).

        Needs no session: a backend may write the bytes straight to where the
        blob will be, and spare the copy a session's commit can cost.
        """
        ...

    def abort_upload(self, upload_id: str) -> None:
        """Discard an upload session; absent sessions are ignored."""
        ...

    def list_uploads(self) -> Iterator[tuple[str, datetime]]:
        """Upload ids with the time they were last written (for expiry)."""
        ...


class BlobAdmin(Protocol):
    def delete(self, digest: Digest) -> None:
        """Remove a blob; raises `BlobNotFound`."""
        ...

    def list_digests(self) -> Iterator[Digest]: ...

    def abort_blob_writes(self, started_before: datetime, *, dry_run: bool = False) -> int:
        """Drop the bytes of `open_blob` writers begun before then and never finished
        (their process died); returns how many (with `dry_run`, how many there are).

        For a backend whose blob writers are upload sessions, which
        `list_uploads` reports, there are none to drop here: 0.
        """
        ...

    def ping(self) -> None:
        """Raise `StorageUnavailable` when the backend cannot serve requests."""
        ...


class BlobStore(BlobReader, BlobIngester, BlobAdmin, Protocol):
    """Everything the service needs from blob storage."""
