"""S3 `BlobStore`: upload sessions are chunk objects, blobs appear by multipart commit.

S3 has no rename and no append, so an upload session is a run of immutable
chunk objects keyed by the offset they start at, and `commit_upload` streams
them in order through a hasher into an S3 multipart upload for the final key.
The multipart upload is completed only after the digest matched; otherwise
it is aborted, and an aborted (or never completed) multipart upload leaves
no object behind. So, as with the filesystem backend, nothing is ever
visible under `blobs/` that was not verified against its digest.

Works against AWS S3 and S3-compatible servers (SeaweedFS, MinIO): requests
use path-style addressing, SigV4 and `Content-MD5` for integrity of every
upload, and no optional checksum headers that some servers reject.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import boto3
from botocore.config import Config
from botocore.exceptions import (
    ClientError,
    ConnectionError,
    HTTPClientError,
    NoCredentialsError,
    PartialCredentialsError,
)

from peftreg.digest import Digest, InvalidDigest
from peftreg.registry.settings import Settings
from peftreg.registry.storage.errors import (
    BlobNotFound,
    DigestMismatch,
    StorageError,
    StorageUnavailable,
    UploadNotFound,
    UploadOffsetMismatch,
)
from peftreg.registry.storage.hashing import RunningHashes
from peftreg.registry.storage.upload_ids import check_upload_id, new_upload_id

if TYPE_CHECKING:
    from botocore.response import StreamingBody
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import CompletedPartTypeDef

READ_CHUNK = 1024 * 1024
# Writers flush a chunk object every CHUNK_SIZE bytes; commits re-buffer the
# chunks into multipart parts of PART_SIZE (S3 wants >= 5 MiB but the last).
CHUNK_SIZE = 8 * 1024 * 1024
PART_SIZE = 8 * 1024 * 1024
_DELETE_BATCH = 1000  # DeleteObjects takes at most 1000 keys

_CHUNK_NAME = re.compile(r"^[0-9]{20}$")
_MARKER_NAME = "_started"
_MISSING_CODES = frozenset({"404", "NoSuchKey", "NotFound"})
_UNAVAILABLE_CODES = frozenset(
    {
        "NoSuchBucket",
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "SlowDown",
        "ServiceUnavailable",
        "InternalError",
        "RequestTimeout",
    }
)
_CONNECTION_ERRORS = (ConnectionError, HTTPClientError, NoCredentialsError, PartialCredentialsError)


@dataclass(frozen=True)
class KeyLayout:
    """Every object key the backend uses, derived in this one place.

    Layout under the bucket (`prefix` is `s3_prefix` with a trailing ``/``,
    or empty)::

        <prefix>
          blobs/<algorithm>/<hex[:2]>/<hex>     verified, content-addressed blobs
          uploads/<upload id>/
            _started                            marker: the session exists (even empty)
            <offset:020d>                       chunk of bytes starting at offset

    Chunk names are zero-padded so that listing order is offset order. An
    upload's bytes never live under `blobs/`: they reach it only through a
    multipart upload (or single put) that `commit_upload` completes after
    verifying the digest.
    """

    prefix: str = ""

    @classmethod
    def from_prefix(cls, prefix: str) -> KeyLayout:
        prefix = prefix.strip("/")
        return cls(f"{prefix}/" if prefix else "")

    @property
    def blobs(self) -> str:
        return f"{self.prefix}blobs/"

    @property
    def uploads(self) -> str:
        return f"{self.prefix}uploads/"

    def blob(self, digest: Digest) -> str:
        return f"{self.blobs}{digest.algorithm}/{digest.hex[:2]}/{digest.hex}"

    def upload(self, upload_id: str) -> str:
        return f"{self.uploads}{upload_id}/"

    def marker(self, upload_id: str) -> str:
        return f"{self.upload(upload_id)}{_MARKER_NAME}"

    def chunk(self, upload_id: str, offset: int) -> str:
        return f"{self.upload(upload_id)}{offset:020d}"

    def parse_blob(self, key: str) -> Digest | None:
        """The digest a key under `blobs/` names, or None for a stray key."""
        parts = key.removeprefix(self.blobs).split("/")
        if not key.startswith(self.blobs) or len(parts) != 3:
            return None
        algorithm, fanout, hex_ = parts
        try:
            digest = Digest.parse(f"{algorithm}:{hex_}")
        except InvalidDigest:
            return None
        return digest if fanout == hex_[:2] else None

    def parse_upload(self, key: str) -> tuple[str, str] | None:
        """(upload id, object name) of a key under `uploads/`."""
        parts = key.removeprefix(self.uploads).split("/")
        if not key.startswith(self.uploads) or len(parts) != 2 or not parts[0]:
            return None
        return parts[0], parts[1]


@dataclass(frozen=True)
class _Chunk:
    offset: int
    size: int
    key: str


def _content_md5(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def _is_missing(exc: ClientError) -> bool:
    return _error_code(exc) in _MISSING_CODES


def _translate(exc: ClientError) -> StorageError:
    code = _error_code(exc)
    if code in _UNAVAILABLE_CODES or _status(exc) >= 500:
        return StorageUnavailable(f"S3 request failed: {exc}")
    return StorageError(f"S3 request failed: {exc}")


@contextmanager
def _s3_errors(missing: StorageError | None = None) -> Iterator[None]:
    """Turn botocore failures into storage errors.

    A 404 for a key becomes `missing` when given; unreachable endpoints,
    missing credentials, a missing bucket and server errors become
    `StorageUnavailable`; other client errors a plain `StorageError`.
    """
    try:
        yield
    except ClientError as exc:
        if missing is not None and _is_missing(exc):
            raise missing from None
        raise _translate(exc) from exc
    except _CONNECTION_ERRORS as exc:
        raise StorageUnavailable(f"S3 endpoint unavailable: {exc}") from exc


class S3UploadWriter:
    """Buffers appended bytes and stores them as chunk objects of `CHUNK_SIZE`."""

    def __init__(self, store: S3BlobStore, upload_id: str, offset: int) -> None:
        self._store = store
        self._upload_id = upload_id
        self._start = offset
        self._position = offset  # where the next flushed chunk starts
        self._buffer = bytearray()
        self._written: list[str] = []
        self._hash = store.hashes.begin(upload_id, offset)

    def write(self, data: bytes) -> None:
        self._buffer += data
        if self._hash is not None:
            self._hash.update(data)
        while len(self._buffer) >= self._store.chunk_size:
            self._flush(self._store.chunk_size)

    def close(self) -> int:
        if self._buffer:
            self._flush(len(self._buffer))
        if self._hash is not None:
            self._store.hashes.advance(self._upload_id, self._start, self._position, self._hash)
        return self._position

    def cancel(self) -> None:
        self._buffer.clear()
        self._store.hashes.forget(self._upload_id)
        self._store._delete_keys(self._written)
        self._written.clear()

    def _flush(self, size: int) -> None:
        data = bytes(self._buffer[:size])
        key = self._store.layout.chunk(self._upload_id, self._position)
        self._store._put(key, data)
        self._written.append(key)
        del self._buffer[:size]
        self._position += size


class S3BlobStore:
    def __init__(
        self,
        client: S3Client,
        bucket: str,
        prefix: str = "",
        *,
        redirect: bool = False,
        presign_seconds: int = 900,
        chunk_size: int = CHUNK_SIZE,
    ) -> None:
        self.client = client
        self.bucket = bucket
        self.layout = KeyLayout.from_prefix(prefix)
        self.redirect = redirect
        self.presign_seconds = presign_seconds
        self.chunk_size = chunk_size
        self.hashes = RunningHashes()

    @classmethod
    def from_settings(cls, settings: Settings) -> S3BlobStore:
        if not settings.s3_bucket:
            raise ValueError("the s3 storage backend needs PEFTREG_S3_BUCKET")
        secret = settings.s3_secret_access_key
        client = boto3.client(
            "s3",
            endpoint_url=settings.s3_endpoint_url,
            region_name=settings.s3_region,
            aws_access_key_id=settings.s3_access_key_id,
            aws_secret_access_key=secret.get_secret_value() if secret is not None else None,
            config=Config(
                s3={"addressing_style": "path"},
                signature_version="s3v4",
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                retries={"mode": "standard", "max_attempts": 3},
                connect_timeout=10,
                read_timeout=60,
            ),
        )
        return cls(
            client,
            settings.s3_bucket,
            settings.s3_prefix,
            redirect=settings.s3_redirect,
            presign_seconds=settings.s3_presign_seconds,
        )

    # reading
    def stat(self, digest: Digest) -> int:
        with _s3_errors(BlobNotFound(digest)):
            head = self.client.head_object(Bucket=self.bucket, Key=self.layout.blob(digest))
        return head["ContentLength"]

    def read(self, digest: Digest, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        if end is not None and end <= start:
            self.stat(digest)
            return iter(())
        key = self.layout.blob(digest)
        with _s3_errors(BlobNotFound(digest)):
            try:
                if start == 0 and end is None:
                    response = self.client.get_object(Bucket=self.bucket, Key=key)
                else:
                    last = "" if end is None else str(end - 1)
                    response = self.client.get_object(
                        Bucket=self.bucket, Key=key, Range=f"bytes={start}-{last}"
                    )
            except ClientError as exc:
                if _error_code(exc) != "InvalidRange":
                    raise
                self.stat(digest)  # starts at or past the end: nothing to read
                return iter(())
        return self._iter_body(response["Body"])

    @staticmethod
    def _iter_body(body: StreamingBody) -> Iterator[bytes]:
        try:
            with _s3_errors():
                yield from body.iter_chunks(READ_CHUNK)
        finally:
            body.close()

    def redirect_url(self, digest: Digest) -> str | None:
        if not self.redirect:
            return None
        return self.client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": self.layout.blob(digest)},
            ExpiresIn=self.presign_seconds,
        )

    # ingesting
    def create_upload(self) -> str:
        upload_id = new_upload_id()
        self._put(self.layout.marker(upload_id), b"")
        return upload_id

    def upload_size(self, upload_id: str) -> int:
        chunks, _ = self._session(check_upload_id(upload_id))
        return sum(chunk.size for chunk in chunks)

    def open_writer(self, upload_id: str, offset: int) -> S3UploadWriter:
        checked = check_upload_id(upload_id)
        chunks, stale = self._session(checked)
        size = sum(chunk.size for chunk in chunks)
        if offset != size:
            raise UploadOffsetMismatch(upload_id, size, offset)
        # Leftovers of a writer that died mid-cancel could line up with the new
        # chunks and join the session; drop them before appending.
        self._delete_keys(stale)
        return S3UploadWriter(self, checked, offset)

    def commit_upload(self, upload_id: str, digest: Digest) -> int:
        checked = check_upload_id(upload_id)
        chunks, _ = self._session(checked)
        size = sum(chunk.size for chunk in chunks)
        known = self.hashes.take(checked, size) if digest.algorithm == "sha256" else None
        if known is not None and known != digest.hex:
            self.abort_upload(checked)
            raise DigestMismatch(digest, Digest("sha256", known), size)
        target = self.layout.blob(digest)
        try:
            if self._exists(target):
                if known is None:
                    size = self._verify(digest, self._stream(checked, chunks))
            elif size <= PART_SIZE:
                data = b"".join(self._stream(checked, chunks))
                size = self._verify(digest, [data])
                self._put(target, data)
            else:
                size = self._multipart_put(target, digest, self._stream(checked, chunks))
        except DigestMismatch:
            self.abort_upload(checked)
            raise
        self.abort_upload(checked)
        return size

    def abort_upload(self, upload_id: str) -> None:
        self.hashes.forget(upload_id)
        try:
            checked = check_upload_id(upload_id)
        except UploadNotFound:
            return
        self._delete_keys([key for key, _, _ in self._list(self.layout.upload(checked))])

    def list_uploads(self) -> Iterator[tuple[str, datetime]]:
        latest: dict[str, datetime] = {}
        for key, _, modified in self._list(self.layout.uploads):
            parsed = self.layout.parse_upload(key)
            if parsed is None:
                continue
            upload_id = parsed[0]
            if upload_id not in latest or modified > latest[upload_id]:
                latest[upload_id] = modified
        for upload_id, modified in latest.items():
            yield upload_id, modified.astimezone(UTC)

    # administration
    def delete(self, digest: Digest) -> None:
        self.stat(digest)  # S3 deletes of absent keys succeed; the protocol wants an error
        with _s3_errors():
            self.client.delete_object(Bucket=self.bucket, Key=self.layout.blob(digest))

    def list_digests(self) -> Iterator[Digest]:
        for key, _, _ in self._list(self.layout.blobs):
            digest = self.layout.parse_blob(key)
            if digest is not None:
                yield digest

    def ping(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except (ClientError, *_CONNECTION_ERRORS) as exc:
            raise StorageUnavailable(f"S3 bucket {self.bucket!r} is not usable: {exc}") from exc

    # helpers
    def _put(self, key: str, data: bytes) -> None:
        with _s3_errors():
            self.client.put_object(
                Bucket=self.bucket, Key=key, Body=data, ContentMD5=_content_md5(data)
            )

    def _exists(self, key: str) -> bool:
        with _s3_errors():
            try:
                self.client.head_object(Bucket=self.bucket, Key=key)
            except ClientError as exc:
                if _is_missing(exc):
                    return False
                raise
        return True

    def _list(self, prefix: str) -> Iterator[tuple[str, int, datetime]]:
        """(key, size, last modified) of every object under `prefix`, in key order."""
        paginator = self.client.get_paginator("list_objects_v2")
        with _s3_errors():
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                for item in page.get("Contents", []):
                    yield item["Key"], item["Size"], item["LastModified"]

    def _delete_keys(self, keys: list[str]) -> None:
        for start in range(0, len(keys), _DELETE_BATCH):
            batch = keys[start : start + _DELETE_BATCH]
            with _s3_errors():
                response = self.client.delete_objects(
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": key} for key in batch], "Quiet": True},
                )
            errors = [e for e in response.get("Errors", []) if e.get("Code") != "NoSuchKey"]
            if errors:
                raise StorageError(f"S3 could not delete {len(errors)} objects: {errors[:3]}")

    def _session(self, upload_id: str) -> tuple[list[_Chunk], list[str]]:
        """The contiguous chunks of a session from offset 0, and stale chunk keys.

        A chunk belongs to the session only if it starts exactly where the
        previous one ended; anything else is the leftover of a cancelled
        writer. Raises `UploadNotFound` when the session has no objects.
        """
        found = False
        chunks: list[_Chunk] = []
        for key, size, _ in self._list(self.layout.upload(upload_id)):
            found = True
            name = key.rsplit("/", 1)[-1]
            if _CHUNK_NAME.match(name):
                chunks.append(_Chunk(int(name), size, key))
        if not found:
            raise UploadNotFound(upload_id)
        contiguous: list[_Chunk] = []
        stale: list[str] = []
        position = 0
        for chunk in sorted(chunks, key=lambda c: c.offset):
            if chunk.offset == position:
                contiguous.append(chunk)
                position += chunk.size
            else:
                stale.append(chunk.key)
        return contiguous, stale

    def _stream(self, upload_id: str, chunks: list[_Chunk]) -> Iterator[bytes]:
        for chunk in chunks:
            with _s3_errors(UploadNotFound(upload_id)):
                body = self.client.get_object(Bucket=self.bucket, Key=chunk.key)["Body"]
            yield from self._iter_body(body)

    @staticmethod
    def _verify(digest: Digest, pieces: Iterable[bytes]) -> int:
        hasher = digest.hasher()
        size = 0
        for piece in pieces:
            hasher.update(piece)
            size += len(piece)
        actual = Digest(digest.algorithm, hasher.hexdigest())
        if actual != digest:
            raise DigestMismatch(digest, actual, size)
        return size

    def _multipart_put(self, key: str, digest: Digest, pieces: Iterable[bytes]) -> int:
        """Copy `pieces` to `key`, completing the upload only if they hash to `digest`.

        The bytes are hashed as they are sent, so what becomes visible is
        exactly what was verified, even if the chunks changed meanwhile.
        """
        with _s3_errors():
            multipart = self.client.create_multipart_upload(Bucket=self.bucket, Key=key)
        multipart_id = multipart["UploadId"]
        parts: list[CompletedPartTypeDef] = []
        completed = False

        def send(data: bytes) -> None:
            number = len(parts) + 1
            with _s3_errors():
                response = self.client.upload_part(
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=multipart_id,
                    PartNumber=number,
                    Body=data,
                    ContentMD5=_content_md5(data),
                )
            parts.append({"ETag": response["ETag"], "PartNumber": number})

        try:
            hasher = digest.hasher()
            size = 0
            buffer = bytearray()
            for piece in pieces:
                hasher.update(piece)
                size += len(piece)
                buffer += piece
                while len(buffer) >= PART_SIZE:
                    send(bytes(buffer[:PART_SIZE]))
                    del buffer[:PART_SIZE]
            if buffer or not parts:
                send(bytes(buffer))
            actual = Digest(digest.algorithm, hasher.hexdigest())
            if actual != digest:
                raise DigestMismatch(digest, actual, size)
            with _s3_errors():
                self.client.complete_multipart_upload(
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=multipart_id,
                    MultipartUpload={"Parts": parts},
                )
            completed = True
            return size
        finally:
            if not completed:
                self._abort_multipart(key, multipart_id)

    def _abort_multipart(self, key: str, multipart_id: str) -> None:
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=multipart_id)
        except (ClientError, *_CONNECTION_ERRORS):
            # Best effort: an incomplete multipart upload is invisible anyway and
            # a bucket lifecycle rule (AbortIncompleteMultipartUpload) reaps it.
            pass
