"""Blob downloads into the cache: resumable, parallel for large blobs, verified.

Bytes go to `blobs/sha256/<hex>.incomplete`; an interrupted download
resumes from what that file holds (a `Range` request). Blobs over
`PARALLEL_THRESHOLD` are fetched as `PARALLEL_PARTS` ranged GETs at once,
their progress kept in `<hex>.incomplete.parts`. Every byte is hashed and
compared with the digest before the file is renamed to its final name; a
mismatch deletes the partial file. A per-digest file lock makes concurrent
processes download a blob once: the others wait and find it present.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx

from peftreg.cache import Cache
from peftreg.digest import Digest, digest_file
from peftreg.sdk.errors import DigestMismatch, PeftregError, ServerError, TransportError
from peftreg.sdk.http import HttpSession
from peftreg.transfer.progress import NullProgress, Progress

PARALLEL_THRESHOLD = 64 * 1024 * 1024
PARALLEL_PARTS = 4
STREAM_CHUNK = 1024 * 1024
SAVE_EVERY = 2 * 1024 * 1024
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
    parallel_threshold: int = PARALLEL_THRESHOLD,
    parts: int = PARALLEL_PARTS,
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
        parts_file = cache.parts_path(digest)
        fetcher = _Fetcher(http, blob_url(repository, digest), size, progress)
        if parts_file.exists() or (not partial.exists() and size > parallel_threshold):
            fetcher.parallel(partial, parts_file, max(1, parts))
            actual, actual_size = digest_file(partial, digest.algorithm)
        else:
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

    def _check_range(self, response: httpx.Response, start: int) -> None:
        if start == 0 and response.status_code == 200:
            return
        match = _CONTENT_RANGE_RE.match(response.headers.get("content-range", ""))
        if response.status_code != 206 or match is None or int(match.group(1)) != start:
            raise PeftregError(f"the server did not honour the range request for {self.url}")

    # one stream -------------------------------------------------------------

    def single(self, partial: Path, algorithm: str) -> tuple[Digest, int]:
        hasher = hashlib.new(algorithm)
        offset = 0
        if partial.exists():
            if partial.stat().st_size > self.size:
                partial.unlink()
            else:
                with partial.open("rb") as existing:
                    while chunk := existing.read(STREAM_CHUNK * 4):
                        hasher.update(chunk)
                        offset += len(chunk)
                self.progress.advance(offset)
        state = {"offset": offset}

        def attempt() -> None:
            start = state["offset"]
            if start >= self.size:
                partial.touch()
                return
            headers = {"Range": f"bytes={start}-"} if start else {}
            with self.http.stream("GET", self.url, headers=headers) as response:
                self._check_range(response, start)
                with partial.open("ab" if start else "wb") as out:
                    for chunk in response.iter_bytes(STREAM_CHUNK):
                        if state["offset"] + len(chunk) > self.size:
                            raise DigestMismatch(f"{self.url} sent more than {self.size} bytes")
                        out.write(chunk)
                        hasher.update(chunk)
                        state["offset"] += len(chunk)
                        self._count(len(chunk))
            if state["offset"] < self.size:
                raise _Interrupted(f"stream ended at byte {state['offset']} of {self.size}")

        self._with_retries(attempt)
        return Digest(algorithm, hasher.hexdigest()), state["offset"]

    # ranged parts in parallel -----------------------------------------------

    def parallel(self, partial: Path, parts_file: Path, parts: int) -> None:
        ranges = self._load_parts(partial, parts_file, parts)
        fd = os.open(partial, os.O_RDWR | os.O_CREAT, 0o644)
        state_lock = threading.Lock()
        try:
            if os.fstat(fd).st_size != self.size:
                os.ftruncate(fd, self.size)
            self.progress.advance(sum(done for _s, _e, done in ranges))

            def save() -> None:
                staging = parts_file.with_name(parts_file.name + ".tmp")
                staging.write_text(json.dumps({"size": self.size, "parts": ranges}))
                os.replace(staging, parts_file)

            with state_lock:
                save()

            def run_part(index: int) -> None:
                def attempt() -> None:
                    start, end, done = ranges[index]
                    if start + done >= end:
                        return
                    headers = {"Range": f"bytes={start + done}-{end - 1}"}
                    unsaved = 0
                    with self.http.stream("GET", self.url, headers=headers) as response:
                        self._check_range(response, start + done)
                        for chunk in response.iter_bytes(STREAM_CHUNK):
                            position = start + ranges[index][2]
                            if position + len(chunk) > end:
                                raise DigestMismatch(f"{self.url} sent more than was asked")
                            os.pwrite(fd, chunk, position)
                            ranges[index][2] += len(chunk)
                            self._count(len(chunk))
                            unsaved += len(chunk)
                            if unsaved >= SAVE_EVERY:
                                unsaved = 0
                                with state_lock:
                                    save()
                    with state_lock:
                        save()
                    if start + ranges[index][2] < end:
                        raise _Interrupted(f"part {index} ended early")

                try:
                    self._with_retries(attempt)
                finally:
                    with state_lock:
                        save()

            with ThreadPoolExecutor(max_workers=len(ranges)) as pool:
                futures = [pool.submit(run_part, index) for index in range(len(ranges))]
                errors = [future.exception() for future in futures]
            for error in errors:
                if error is not None:
                    raise error
        finally:
            os.close(fd)

    def _load_parts(self, partial: Path, parts_file: Path, parts: int) -> list[list[int]]:
        with contextlib.suppress(FileNotFoundError, ValueError, KeyError, TypeError):
            state = json.loads(parts_file.read_text())
            ranges = [[int(s), int(e), int(d)] for s, e, d in state["parts"]]
            if int(state["size"]) == self.size and partial.exists() and ranges:
                return ranges
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
        step = -(-self.size // parts)
        return [[start, min(start + step, self.size), 0] for start in range(0, self.size, step)]
