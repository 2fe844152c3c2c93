"""Blob downloads into the cache: resumable, verified while they are written.

Bytes go to `blobs/sha256/<hex>.incomplete` as they arrive from one GET,
and a hashing thread follows the writes, so the digest is known when the
last byte lands: the file is never read back from the disk. On a plain
connection the body is spliced from the socket into the file
(`peftreg.splice`: one copy, in the kernel) and the hash reads each landed
range back from the page cache; otherwise it hashes the received pieces.
Writeback to disk starts as the bytes arrive (`peftreg.writeback`) and the
complete file is fsynced before the rename, so a crash never leaves a torn
blob under a verified name, and that fsync waits only for the tail. An interrupted download
resumes from what the `.incomplete` file holds (a `Range` request; only
then is that prefix read, to hash it). A mismatch deletes the partial file;
a match renames it to its final name. A per-digest file lock makes
concurrent processes download a blob once: the others wait and find it
present.

One stream, not parallel ranged GETs: parallel parts could only be
verified by reading the file again, which costs more than they save on
any link where one TCP stream fills the pipe.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from peftreg.cache import Cache
from peftreg.digest import Digest
from peftreg.following_hash import FollowingHash
from peftreg.sdk.errors import DigestMismatch, PeftregError, ServerError, TransportError
from peftreg.sdk.http import Body, HttpSession
from peftreg.transfer.progress import NullProgress, Progress
from peftreg.writeback import EarlyWriteback

READ_CHUNK = 4 * 1024 * 1024
HASH_QUEUE = 8  # chunks (of at most 4 MiB, the transport's read size) the hash may lag
# From this size a blob's body is read with http.client (HttpSession.body): smaller ones
# reuse the session's open httpx connection, and would not notice the difference.
LARGE_BODY = 8 * 1024 * 1024
_CONTENT_RANGE_RE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


class _Interrupted(Exception):
    """The body ended or broke before the expected bytes arrived."""


@dataclass
class DownloadResult:
    path: Path
    downloaded: int  # bytes received in this call (0 when the cache had it)


def blob_url(repository: str, digest: Digest) -> str:
    return f"/v2/{repository}/blobs/{digest}"


def download_blob(
    http: HttpSession,
    repository: str,
    digest: Digest,
    size: int,
    cache: Cache,
    *,
    progress: Progress | None = None,
) -> DownloadResult:
    """Make `digest` present and verified in the cache; download it if needed."""
    progress = progress or NullProgress()
    if cache.has_blob(digest, size):
        progress.advance(size)
        return DownloadResult(cache.blob_path(digest), 0)
    cache.blob_path(digest).parent.mkdir(parents=True, exist_ok=True)
    with cache.lock(str(digest)):
        if cache.has_blob(digest, size):
            progress.advance(size)
            return DownloadResult(cache.blob_path(digest), 0)
        partial = cache.incomplete_path(digest)
        cache.parts_path(digest).unlink(missing_ok=True)  # left by older versions
        fetcher = _Fetcher(http, blob_url(repository, digest), size, progress)
        actual, actual_size = fetcher.single(partial, digest.algorithm)
        if actual != digest or actual_size != size:
            cache.discard_partial(digest)
            raise DigestMismatch(
                f"digest mismatch: blob {digest} from {repository} arrived as {actual} "
                f"({actual_size} of {size} bytes); nothing was kept"
            )
        return DownloadResult(cache.commit_blob(digest, partial), fetcher.received)


class _Fetcher:
    def __init__(self, http: HttpSession, url: str, size: int, progress: Progress) -> None:
        self.http = http
        self.url = url
        self.size = size
        self.progress = progress
        self.received = 0
        self._lock = threading.Lock()

    def _count(self, nbytes: int) -> None:
        with self._lock:
            self.received += nbytes
        self.progress.advance(nbytes)

    def _with_retries(self, what: Callable[[], None]) -> None:
        """Run `what` until it completes; connection breaks are retried with backoff."""
        attempt = 0
        while True:
            try:
                what()
                return
            except (httpx.TransportError, TransportError, _Interrupted, ServerError) as exc:
                if attempt >= self.http.retries:
                    raise TransportError(
                        f"download of {self.url} interrupted: {exc}; run the pull again to resume"
                    ) from exc
                time.sleep(self.http.delay(attempt))
                attempt += 1

    def _check_range(self, response: Body, start: int) -> None:
        if start == 0 and response.status_code == 200:
            return
        match = _CONTENT_RANGE_RE.match(response.headers.get("content-range", ""))
        if response.status_code != 206 or match is None or int(match.group(1)) != start:
            raise PeftregError(f"the server did not honour the range request for {self.url}")

    # one stream, hashed by a thread that follows the writes ------------------

    def single(self, partial: Path, algorithm: str) -> tuple[Digest, int]:
        hasher = FollowingHash(hashlib.new(algorithm), HASH_QUEUE)
        offset = 0
        state = {"offset": offset}
        try:
            if partial.exists():
                if partial.stat().st_size > self.size:
                    partial.unlink()
                else:
                    with partial.open("rb") as existing:
                        while chunk := existing.read(READ_CHUNK):
                            hasher.update(chunk)
                            offset += len(chunk)
                    self.progress.advance(offset)
                    state["offset"] = offset

            def attempt() -> None:
                start = state["offset"]
                if start >= self.size:
                    partial.touch()
                    return
                headers = {"Range": f"bytes={start}-"} if start else {}
                large = self.size - start >= LARGE_BODY
                with self.http.body(self.url, headers=headers, large=large) as response:
                    self._check_range(response, start)
                    fd = os.open(partial, os.O_RDWR | os.O_CREAT | (0 if start else os.O_TRUNC))
                    landing = _Landing(fd, start, hasher, self._count)
                    try:
                        os.lseek(fd, start, os.SEEK_SET)
                        self._receive(response, landing)
                        if landing.offset == self.size:
                            os.fsync(fd)  # durable before `commit_blob` renames it
                    finally:
                        # A break leaves the file and the hash at the same offset: resume there.
                        state["offset"] = landing.offset
                        hasher.drain()  # its file ranges read `fd`
                        os.close(fd)
                if state["offset"] < self.size:
                    raise _Interrupted(f"stream ended at byte {state['offset']} of {self.size}")

            self._with_retries(attempt)
        finally:
            digest = Digest(algorithm, hasher.finish().hexdigest())
        return digest, state["offset"]

    def _receive(self, response: Body, landing: _Landing) -> None:
        """Land the body in the file: spliced where it can be, else piece by piece."""
        if not response.splice_into(landing.fd, self.size - landing.offset, landing.landed):
            for chunk in response.chunks(READ_CHUNK):
                if landing.offset + len(chunk) > self.size:
                    raise DigestMismatch(f"{self.url} sent more than {self.size} bytes")
                landing.write(chunk)


class _Landing:
    """Bytes landing in a download's file: hashed, written back early, counted.

    `offset` moves only once a piece is in the file and handed to the hash,
    so after a break both hold exactly the bytes before it.
    """

    def __init__(
        self, fd: int, offset: int, hasher: FollowingHash, count: Callable[[int], None]
    ) -> None:
        self.fd = fd
        self.offset = offset
        self._hasher = hasher
        self._writeback = EarlyWriteback(fd, offset)
        self._count = count

    def write(self, chunk: bytes) -> None:
        """Write a received piece and hash it as it is."""
        view = memoryview(chunk)
        while view:
            view = view[os.write(self.fd, view) :]
        self._hasher.update(chunk)
        self._advance(len(chunk))

    def landed(self, nbytes: int) -> None:
        """`nbytes` more were spliced into the file: hash them from it."""
        self._hasher.update_file(self.fd, self.offset, self.offset + nbytes)
        self._advance(nbytes)

    def _advance(self, nbytes: int) -> None:
        self.offset += nbytes
        self._writeback.written(self.offset)
        self._count(nbytes)
