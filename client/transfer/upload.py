"""Blob uploads through OCI upload sessions: skipped, mounted, monolithic or chunked.

A blob the repository already has is skipped (HEAD). With `mount_from`, the
server is asked to mount it from that repository. Small blobs go in one
`POST ?digest=`; larger ones as a session: `POST`, then `PATCH` chunks with
`Content-Range`, then `PUT ?digest=`. When a chunk fails on the connection,
the session's offset is asked for (`GET`) and the upload continues there.
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import BinaryIO, Literal

from peftreg.digest import Digest
from peftreg.sdk.errors import NotFound, PeftregError, RangeNotSatisfiable, TransportError
from peftreg.sdk.http import HttpSession
from peftreg.transfer.progress import NullProgress, Progress

CHUNK_SIZE = 16 * 1024 * 1024
MONOLITHIC_MAX = CHUNK_SIZE
OCTET_STREAM = "application/octet-stream"
UploadOutcome = Literal["exists", "mounted", "uploaded"]


def uploads_url(repository: str) -> str:
    return f"/v2/{repository}/blobs/uploads/"


def blob_size(http: HttpSession, repository: str, digest: Digest) -> int | None:
    """The blob's size if the repository has it, else None."""
    response = http.request("HEAD", f"/v2/{repository}/blobs/{digest}", ok=(404,))
    if response.status_code == 404:
        return None
    return int(response.headers.get("content-length", "0"))


def mount_blob(http: HttpSession, repository: str, digest: Digest, source: str) -> str | None:
    """Ask for a cross-repository mount; None when mounted, else the new session's URL."""
    response = http.request(
        "POST",
        uploads_url(repository),
        params={"mount": str(digest), "from": source},
        idempotent=True,
    )
    if response.status_code == 201:
        return None
    return response.headers["location"]


def session_offset(http: HttpSession, location: str) -> int:
    """How many bytes an upload session holds (from the `Range: 0-<last>` header)."""
    response = http.request("GET", location)
    last = response.headers.get("range", "0-0").rpartition("-")[2]
    # `0-0` means nothing or one byte; a wrong guess is corrected by the 416's offset.
    return int(last) + 1 if int(last) > 0 else 0


def upload_blob(
    http: HttpSession,
    repository: str,
    digest: Digest,
    size: int,
    source: Path | bytes,
    *,
    mount_from: str | None = None,
    chunk_size: int = CHUNK_SIZE,
    monolithic_max: int = MONOLITHIC_MAX,
    progress: Progress | None = None,
) -> UploadOutcome:
    """Make the repository hold the blob; say how."""
    progress = progress or NullProgress()
    if blob_size(http, repository, digest) is not None:
        progress.advance(size)
        return "exists"
    location: str | None = None
    if mount_from and mount_from != repository:
        location = mount_blob(http, repository, digest, mount_from)
        if location is None:
            progress.advance(size)
            return "mounted"
    with _open(source) as stream:
        if location is None and size <= monolithic_max:
            http.request(
                "POST",
                uploads_url(repository),
                params={"digest": str(digest)},
                content=stream.read(),
                headers={"Content-Type": OCTET_STREAM},
                idempotent=True,  # content-addressed: sending it again is harmless
            )
            progress.advance(size)
            return "uploaded"
        if location is None:
            location = http.request("POST", uploads_url(repository)).headers["location"]
        location = _send_chunks(http, location, stream, size, chunk_size, progress)
    _finish(http, repository, location, digest)
    return "uploaded"


def _open(source: Path | bytes) -> BinaryIO:
    if isinstance(source, bytes):
        return io.BytesIO(source)
    return source.open("rb")


def _send_chunks(
    http: HttpSession,
    location: str,
    stream: BinaryIO,
    size: int,
    chunk_size: int,
    progress: Progress,
) -> str:
    offset = 0
    failures = 0
    while offset < size:
        stream.seek(offset)
        chunk = stream.read(min(chunk_size, size - offset))
        try:
            response = http.request(
                "PATCH",
                location,
                content=chunk,
                headers={
                    "Content-Type": OCTET_STREAM,
                    "Content-Range": f"{offset}-{offset + len(chunk) - 1}",
                },
            )
        except TransportError:
            if failures >= http.retries:
                raise
            time.sleep(http.delay(failures))
            failures += 1
            resumed = session_offset(http, location)
            progress.advance(resumed - offset)
            offset = resumed
            continue
        except RangeNotSatisfiable as exc:
            if exc.offset is None or failures >= http.retries:
                raise
            failures += 1
            progress.advance(exc.offset - offset)
            offset = exc.offset
            continue
        location = response.headers.get("location", location)
        offset += len(chunk)
        progress.advance(len(chunk))
    return location


def _finish(http: HttpSession, repository: str, location: str, digest: Digest) -> None:
    failures = 0
    while True:
        try:
            http.request("PUT", location, params={"digest": str(digest)}, idempotent=False)
            return
        except (TransportError, NotFound) as exc:
            # The PUT may have landed before the connection broke.
            if blob_size(http, repository, digest) is not None:
                return
            if isinstance(exc, NotFound) or failures >= http.retries:
                raise
            time.sleep(http.delay(failures))
            failures += 1
        except PeftregError:
            raise
