"""S3 `BlobStore`: upload sessions are segment objects, blobs appear by server-side copy.

S3 has no rename and no append, so an upload session is a run of immutable
segment objects, one per writer (see `s3_writer`): each is hashed while it
streams in and sent as multipart parts, so the bytes cross the network once.
`commit_upload` checks the digest against that running hash (re-reading the
segments only when this process did not see them all written, e.g. after a
restart or when another replica wrote some) and then has the store copy the
segments to the content-addressed key: one `CopyObject`, or a multipart
upload of `UploadPartCopy` ranges that is completed only after the check.
So, as with the filesystem backend, nothing is ever visible under `blobs/`
that was not verified against its digest. A blob whose digest comes first
(`open_blob`) skips the session and the copy: see `s3_blob`.

Works against AWS S3 and S3-compatible servers (SeaweedFS, MinIO): requests
use path-style addressing, SigV4 and `Content-MD5` for integrity of every
upload, and no optional checksum headers that some servers reject.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import TYPE_CHECKING, BinaryIO

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from peftreg.digest import Digest
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
from peftreg.registry.storage.s3_blob import S3BlobWriter
from peftreg.registry.storage.s3_calls import (
    CONNECTION_ERRORS,
    content_md5,
    error_code,
    is_missing,
    s3_errors,
)
from peftreg.registry.storage.s3_layout import KeyLayout, Segment, contiguous, segment_offset
from peftreg.registry.storage.s3_multipart import MultipartUpload
from peftreg.registry.storage.s3_writer import S3UploadWriter
from peftreg.registry.storage.upload_ids import check_upload_id, new_upload_id

if TYPE_CHECKING:
    from botocore.response import StreamingBody
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import MultipartUploadTypeDef

__all__ = ["KeyLayout", "S3BlobStore", "S3BlobWriter", "S3UploadWriter"]

logger = logging.getLogger(__name__)
READ_CHUNK = 1024 * 1024
MiB = 1024 * 1024
# Writers send parts of PART_SIZE; S3 takes at most 10,000 parts, each of at
# least MIN_PART_SIZE but the last, and copies at most 5 GiB in one request.
PART_SIZE = 8 * MiB
MIN_PART_SIZE = 5 * MiB
MAX_PARTS = 10_000
COPY_PART_SIZE = 256 * MiB
PARTS_IN_FLIGHT = 2  # per writer: memory stays within (PARTS_IN_FLIGHT + 1) parts
COPIES_IN_FLIGHT = 4
_POOL_THREADS = 16
_DELETE_BATCH = 1000  # DeleteObjects takes at most 1000 keys


class S3BlobStore:
    def __init__(
        self,
        client: S3Client,
        bucket: str,
        prefix: str = "",
        *,
        redirect: bool = False,
        presign_seconds: int = 900,
        part_size: int = PART_SIZE,
        min_part_size: int = MIN_PART_SIZE,
        max_parts: int = MAX_PARTS,
        copy_part_size: int = COPY_PART_SIZE,
    ) -> None:
        self.client = client
        self.bucket = bucket
        self.layout = KeyLayout.from_prefix(prefix)
        self.redirect = redirect
        self.presign_seconds = presign_seconds
        self.part_size = part_size
        self.min_part_size = min_part_size
        self.max_parts = max_parts
        self.copy_part_size = copy_part_size
        self.hashes = RunningHashes()
        self._pool = ThreadPoolExecutor(_POOL_THREADS, thread_name_prefix="peftreg-s3")

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
                # Parts and copies travel in parallel (see PARTS_IN_FLIGHT).
                max_pool_connections=_POOL_THREADS + 8,
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
        with s3_errors(BlobNotFound(digest)):
            head = self.client.head_object(Bucket=self.bucket, Key=self.layout.blob(digest))
        return head["ContentLength"]

    def read(self, digest: Digest, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        if end is not None and end <= start:
            self.stat(digest)
            return iter(())
        key = self.layout.blob(digest)
        with s3_errors(BlobNotFound(digest)):
            try:
                if start == 0 and end is None:
                    response = self.client.get_object(Bucket=self.bucket, Key=key)
                else:
                    last = "" if end is None else str(end - 1)
                    response = self.client.get_object(
                        Bucket=self.bucket, Key=key, Range=f"bytes={start}-{last}"
                    )
            except ClientError as exc:
                if error_code(exc) != "InvalidRange":
                    raise
                self.stat(digest)  # starts at or past the end: nothing to read
                return iter(())
        return self._iter_body(response["Body"])

    @staticmethod
    def _iter_body(body: StreamingBody) -> Iterator[bytes]:
        try:
            with s3_errors():
                yield from body.iter_chunks(READ_CHUNK)
        finally:
            body.close()

    def local_file(self, digest: Digest) -> BinaryIO | None:
        return None

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
        self.put(self.layout.marker(upload_id), b"")
        return upload_id

    def upload_size(self, upload_id: str) -> int:
        segments, _ = self._session(check_upload_id(upload_id))
        return sum(segment.size for segment in segments)

    def open_writer(self, upload_id: str, offset: int) -> S3UploadWriter:
        checked = check_upload_id(upload_id)
        segments, stale = self._session(checked)
        size = sum(segment.size for segment in segments)
        if offset != size:
            raise UploadOffsetMismatch(upload_id, size, offset)
        # Leftovers of a writer that died mid-cancel could line up with the new
        # segment and join the session; drop them before appending.
        self.delete_keys([segment.key for segment in stale])
        return S3UploadWriter(self, checked, offset, segments)

    def open_blob(self, digest: Digest) -> S3BlobWriter:
        return S3BlobWriter(self, digest)

    def commit_upload(self, upload_id: str, digest: Digest) -> int:
        checked = check_upload_id(upload_id)
        segments, _ = self._session(checked)
        size = sum(segment.size for segment in segments)
        layout = tuple(segment.key for segment in segments)
        known = self.hashes.take(checked, size, layout) if digest.algorithm == "sha256" else None
        if known is not None:
            actual = Digest("sha256", known)
        else:  # written (partly) elsewhere or before a restart: hash what is stored
            actual = self._hash_stored(checked, digest, segments)
        if actual != digest:
            self.abort_upload(checked)
            raise DigestMismatch(digest, actual, size)
        target = self.layout.blob(digest)
        try:
            if not self.exists(target):
                self._publish(checked, target, digest, segments)
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
        prefix = self.layout.upload(checked)
        self._abort_multiparts(prefix)
        self.delete_keys([key for key, _, _ in self._list(prefix)])

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
        with s3_errors():
            self.client.delete_object(Bucket=self.bucket, Key=self.layout.blob(digest))

    def abort_blob_writes(self, started_before: datetime, *, dry_run: bool = False) -> int:
        """Abort unfinished multipart uploads under `blobs/` begun before then: writers
        (`open_blob`) whose replica died before publishing or cancelling. A lifecycle
        rule (`AbortIncompleteMultipartUpload`) would reap them too, later."""
        stale = [
            upload
            for upload in self._multipart_uploads(self.layout.blobs)
            if upload["Initiated"] < started_before
        ]
        if not dry_run:
            for upload in stale:
                with s3_errors():
                    self.client.abort_multipart_upload(
                        Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                    )
        return len(stale)

    def list_digests(self) -> Iterator[Digest]:
        for key, _, _ in self._list(self.layout.blobs):
            digest = self.layout.parse_blob(key)
            if digest is not None:
                yield digest

    def ping(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except (ClientError, *CONNECTION_ERRORS) as exc:
            raise StorageUnavailable(f"S3 bucket {self.bucket!r} is not usable: {exc}") from exc

    # used by writers
    def put(self, key: str, data: bytes) -> None:
        with s3_errors():
            self.client.put_object(
                Bucket=self.bucket, Key=key, Body=data, ContentMD5=content_md5(data)
            )

    def get_bytes(self, key: str, missing: StorageError) -> bytes:
        with s3_errors(missing):
            return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def exists(self, key: str) -> bool:
        with s3_errors():
            try:
                self.client.head_object(Bucket=self.bucket, Key=key)
            except ClientError as exc:
                if is_missing(exc):
                    return False
                raise
        return True

    def start_multipart(self, key: str, in_flight: int = PARTS_IN_FLIGHT) -> MultipartUpload:
        return MultipartUpload(self.client, self.bucket, key, self._pool, in_flight)

    def delete_keys(self, keys: list[str]) -> None:
        for start in range(0, len(keys), _DELETE_BATCH):
            batch = keys[start : start + _DELETE_BATCH]
            with s3_errors():
                response = self.client.delete_objects(
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": key} for key in batch], "Quiet": True},
                )
            errors = [e for e in response.get("Errors", []) if e.get("Code") != "NoSuchKey"]
            if errors:
                raise StorageError(f"S3 could not delete {len(errors)} objects: {errors[:3]}")

    # helpers
    def _list(self, prefix: str) -> Iterator[tuple[str, int, datetime]]:
        """(key, size, last modified) of every object under `prefix`, in key order."""
        paginator = self.client.get_paginator("list_objects_v2")
        with s3_errors():
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                for item in page.get("Contents", []):
                    yield item["Key"], item["Size"], item["LastModified"]

    def _abort_multiparts(self, prefix: str) -> None:
        """Abort the unfinished multipart uploads of writers that died under `prefix`.

        Housekeeping only (unfinished uploads are invisible, and a bucket
        lifecycle rule reaps them too), so a failure, such as credentials
        without `s3:ListBucketMultipartUploads`, is logged, not raised.
        """
        try:
            for upload in self._multipart_uploads(prefix):
                with s3_errors():
                    self.client.abort_multipart_upload(
                        Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                    )
        except StorageError as exc:
            logger.warning("could not abort unfinished multipart uploads under %s: %s", prefix, exc)

    def _multipart_uploads(self, prefix: str) -> Iterator[MultipartUploadTypeDef]:
        """The unfinished multipart uploads of keys under `prefix`."""
        paginator = self.client.get_paginator("list_multipart_uploads")
        with s3_errors():
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                yield from page.get("Uploads", [])

    def _session(self, upload_id: str) -> tuple[list[Segment], list[Segment]]:
        """The segments of a session from offset 0, and stale ones (see `contiguous`).

        Raises `UploadNotFound` when the session has no objects.
        """
        found = False
        segments: list[Segment] = []
        for key, size, _ in self._list(self.layout.upload(upload_id)):
            found = True
            offset = segment_offset(key.rsplit("/", 1)[-1])
            if offset is not None:
                segments.append(Segment(offset, size, key))
        if not found:
            raise UploadNotFound(upload_id)
        return contiguous(segments)

    def _stream(self, upload_id: str, segments: list[Segment]) -> Iterator[bytes]:
        for segment in segments:
            with s3_errors(UploadNotFound(upload_id)):
                body = self.client.get_object(Bucket=self.bucket, Key=segment.key)["Body"]
            yield from self._iter_body(body)

    def _hash_stored(self, upload_id: str, digest: Digest, segments: list[Segment]) -> Digest:
        hasher = digest.hasher()
        for piece in self._stream(upload_id, segments):
            hasher.update(piece)
        return Digest(digest.algorithm, hasher.hexdigest())

    def _publish(
        self, upload_id: str, target: str, digest: Digest, segments: list[Segment]
    ) -> None:
        """Copy verified segments to `target`, server-side; it appears whole or not at all.

        Segments never change once stored (their keys are unique), so the copy
        holds exactly the bytes that were hashed.
        """
        size = sum(segment.size for segment in segments)
        if not segments:
            self.put(target, b"")
        elif len(segments) == 1 and size <= self.copy_part_size:
            with s3_errors(UploadNotFound(upload_id)):
                self.client.copy_object(
                    Bucket=self.bucket,
                    Key=target,
                    CopySource={"Bucket": self.bucket, "Key": segments[0].key},
                )
        elif any(segment.size < self.min_part_size for segment in segments[:-1]):
            # Cannot be parts of one object (S3's minimum): send the bytes again.
            self._multipart_put(target, digest, self._stream(upload_id, segments))
        else:
            self._multipart_copy(target, segments)

    def _multipart_copy(self, target: str, segments: list[Segment]) -> None:
        multipart = self.start_multipart(target, COPIES_IN_FLIGHT)
        try:
            for segment in segments:
                for start, end in _ranges(segment.size, self.copy_part_size, self.min_part_size):
                    multipart.copy(segment.key, start, end)
            multipart.complete()
        except BaseException:
            multipart.abort()
            raise

    def _multipart_put(self, key: str, digest: Digest, pieces: Iterable[bytes]) -> None:
        """Send `pieces` to `key`, completing the upload only if they hash to `digest`."""
        multipart = self.start_multipart(key)
        completed = False
        try:
            hasher = digest.hasher()
            size = 0
            buffer = bytearray()
            for piece in pieces:
                hasher.update(piece)
                size += len(piece)
                buffer += piece
                while len(buffer) >= self.part_size:
                    with memoryview(buffer) as view:
                        head = bytes(view[: self.part_size])
                    del buffer[: self.part_size]
                    multipart.send(head)
            if buffer or not multipart.parts:
                multipart.send(bytes(buffer))
            actual = Digest(digest.algorithm, hasher.hexdigest())
            if actual != digest:
                raise DigestMismatch(digest, actual, size)
            multipart.complete()
            completed = True
        finally:
            if not completed:
                multipart.abort()


def _ranges(size: int, step: int, minimum: int) -> Iterator[tuple[int, int]]:
    """`[start, end)` pieces of at most `step` (plus a short rest), none under `minimum`."""
    start = 0
    while start < size:
        end = min(size, start + step)
        if size - end < minimum:
            end = size
        yield start, end
        start = end
