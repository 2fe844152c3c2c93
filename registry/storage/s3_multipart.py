"""One S3 multipart upload: parts sent in the background, a few at a time.

Parts go to a thread pool shared by the store, at most `in_flight` of one
upload at once, so a writer hashes and buffers the next part while earlier
ones travel, and its memory stays within `in_flight + 1` parts. Completion
names every part with the ETag its upload returned, so what the object
becomes is exactly the bytes that were sent (and hashed) by this upload.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Executor, Future, wait
from typing import TYPE_CHECKING

from botocore.exceptions import ClientError

from peftreg.registry.storage.s3_calls import CONNECTION_ERRORS, content_md5, s3_errors

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import CompletedPartTypeDef


class MultipartUpload:
    def __init__(
        self, client: S3Client, bucket: str, key: str, pool: Executor, in_flight: int
    ) -> None:
        self._client = client
        self._bucket = bucket
        self.key = key
        self._pool = pool
        self._in_flight = max(1, in_flight)
        with s3_errors():
            self.upload_id = client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
        self._pending: deque[Future[CompletedPartTypeDef]] = deque()
        self._done: list[CompletedPartTypeDef] = []
        self.parts = 0

    def send(self, data: bytes) -> None:
        """Upload `data` as the next part; waits while `in_flight` parts travel."""
        self._make_room()
        self.parts += 1
        self._pending.append(self._pool.submit(self._upload, self.parts, data))

    def copy(self, source_key: str, start: int, end: int) -> None:
        """Make bytes `[start, end)` of another object the next part, server-side."""
        self._make_room()
        self.parts += 1
        self._pending.append(self._pool.submit(self._copy, self.parts, source_key, start, end))

    def complete(self) -> None:
        """Wait for every part and complete; the object appears at once, whole."""
        while self._pending:
            self._done.append(self._pending.popleft().result())
        with s3_errors():
            self._client.complete_multipart_upload(
                Bucket=self._bucket,
                Key=self.key,
                UploadId=self.upload_id,
                MultipartUpload={"Parts": sorted(self._done, key=lambda p: p["PartNumber"])},
            )

    def abort(self) -> None:
        """Drop the upload and its parts (best effort: an unfinished one is invisible)."""
        wait(self._pending)
        self._pending.clear()
        try:
            self._client.abort_multipart_upload(
                Bucket=self._bucket, Key=self.key, UploadId=self.upload_id
            )
        except (ClientError, *CONNECTION_ERRORS):
            # A bucket lifecycle rule (AbortIncompleteMultipartUpload) reaps it,
            # and aborting the session lists and aborts its leftovers.
            pass

    def _make_room(self) -> None:
        while len(self._pending) >= self._in_flight:
            self._done.append(self._pending.popleft().result())

    def _upload(self, number: int, data: bytes) -> CompletedPartTypeDef:
        with s3_errors():
            response = self._client.upload_part(
                Bucket=self._bucket,
                Key=self.key,
                UploadId=self.upload_id,
                PartNumber=number,
                Body=data,
                ContentMD5=content_md5(data),
            )
        return {"ETag": response["ETag"], "PartNumber": number}

    def _copy(self, number: int, source_key: str, start: int, end: int) -> CompletedPartTypeDef:
        with s3_errors():
            response = self._client.upload_part_copy(
                Bucket=self._bucket,
                Key=self.key,
                UploadId=self.upload_id,
                PartNumber=number,
                CopySource={"Bucket": self._bucket, "Key": source_key},
                CopySourceRange=f"bytes={start}-{end - 1}",
            )
        return {"ETag": response["CopyPartResult"]["ETag"], "PartNumber": number}
