"""Blob uploads through OCI upload sessions: skipped, mounted, monolithic or streamed.

A blob the repository already has is skipped (HEAD). With `mount_from`, the
server is asked to mount it from that repository. Small blobs go in one
`POST ?digest=`; larger ones as a session: `POST`, then one `PATCH` that
streams the whole file (read ahead and hashed on a thread while it is sent,
see `readahead`), then `PUT ?digest=`. When the connection breaks, the
session's offset is asked for (`GET`) and a new `PATCH` continues there.
A file whose digest is not known yet is hashed on the way, once.
"""

from __future__ import annotations

import contextlib
import io
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, Literal

import httpx

from peftreg.digest import Digest
from peftreg.sdk.errors import (
    Conflict,
    DigestMismatch,
    NotFound,
    PeftregError,
    RangeNotSatisfiable,
    TransportError,
)
from peftreg.sdk.http import HttpSession
from peftreg.transfer.progress import NullProgress, Progress
from peftreg.transfer.readahead import HashingReader

MONOLITHIC_MAX = 16 * 1024 * 1024
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
    chunk_size: int | None = None,
    monolithic_max: int = MONOLITHIC_MAX,
    progress: Progress | None = None,
) -> UploadOutcome:
    """Make the repository hold a blob of known digest; say how.

    `chunk_size` sends the session as `PATCH` chunks of that size (for
    servers that limit a request's body); by default one streamed `PATCH`.
    """
    progress = progress or NullProgress()
    skipped = _skip(http, repository, digest, size, mount_from, progress)
    if skipped is not None and not isinstance(skipped, str):
        return skipped[0]
    location = skipped
    if location is None and size <= monolithic_max:
        _post_monolithic(http, repository, digest, _read_all(source))
        progress.advance(size)
        return "uploaded"
    if location is None:
        location = _start_session(http, repository)
    if chunk_size is not None or isinstance(source, bytes):
        with _open(source) as stream:
            location = _send_chunks(
                http, location, stream, size, chunk_size or monolithic_max, progress
            )
    else:
        reader = HashingReader(source, size, digest.algorithm)
        location = _stream_session(http, location, reader, progress)
        if reader.digest() != digest:
            _abandon(http, location)
            raise DigestMismatch(f"{source} hashes to {reader.digest()}, not {digest}")
    _finish(http, repository, location, digest)
    return "uploaded"


def upload_file(
    http: HttpSession,
    repository: str,
    path: Path,
    *,
    known: Digest | None = None,
    mount_from: str | None = None,
    monolithic_max: int = MONOLITHIC_MAX,
    progress: Progress | None = None,
) -> tuple[Digest, int, UploadOutcome]:
    """Upload a file whose digest may not be known yet; (digest, size, how).

    A small file is hashed first, so a blob the registry has is skipped. A
    large one with a `known` digest (remembered from an earlier push) is
    checked with HEAD first too; otherwise it is hashed while it streams and
    the session is completed with the digest computed on the way. A `known`
    digest the bytes do not match is not trusted: the bytes' digest is used.
    """
    progress = progress or NullProgress()
    size = path.stat().st_size
    if size <= monolithic_max:
        content = path.read_bytes()  # read once: hashed, then sent unless it is there
        digest = Digest.of_bytes(content)
        skipped = _skip(http, repository, digest, len(content), mount_from, progress)
        if skipped is not None and not isinstance(skipped, str):
            return digest, len(content), skipped[0]
        if skipped is not None:  # a refused mount opened a session: finish it
            _stream_bytes(http, skipped, content, progress, repository, digest)
        else:
            _post_monolithic(http, repository, digest, content)
            progress.advance(len(content))
        return digest, len(content), "uploaded"
    location: str | None = None
    if known is not None:
        skipped = _skip(http, repository, known, size, mount_from, progress)
        if skipped is not None and not isinstance(skipped, str):
            return known, size, skipped[0]
        location = skipped
    location = location or _start_session(http, repository)
    reader = HashingReader(path, size)
    location = _stream_session(http, location, reader, progress)
    digest = reader.digest()
    _finish(http, repository, location, digest)
    return digest, size, "uploaded"


def _stream_bytes(
    http: HttpSession,
    location: str,
    content: bytes,
    progress: Progress,
    repository: str,
    digest: Digest,
) -> None:
    with io.BytesIO(content) as stream:
        location = _send_chunks(http, location, stream, len(content), MONOLITHIC_MAX, progress)
    _finish(http, repository, location, digest)


def _skip(
    http: HttpSession,
    repository: str,
    digest: Digest,
    size: int,
    mount_from: str | None,
    progress: Progress,
) -> tuple[UploadOutcome] | str | None:
    """(outcome,) when nothing needs sending; a session URL a refused mount opened; or None."""
    if blob_size(http, repository, digest) is not None:
        progress.advance(size)
        return ("exists",)
    if mount_from and mount_from != repository:
        location = mount_blob(http, repository, digest, mount_from)
        if location is None:
            progress.advance(size)
            return ("mounted",)
        return location
    return None


def _read_all(source: Path | bytes) -> bytes:
    return source if isinstance(source, bytes) else source.read_bytes()


def _post_monolithic(http: HttpSession, repository: str, digest: Digest, content: bytes) -> None:
    http.request(
        "POST",
        uploads_url(repository),
        params={"digest": str(digest)},
        content=content,
        headers={"Content-Type": OCTET_STREAM},
        idempotent=True,  # content-addressed: sending it again is harmless
    )


def _start_session(http: HttpSession, repository: str) -> str:
    return http.request("POST", uploads_url(repository)).headers["location"]


def _abandon(http: HttpSession, location: str) -> None:
    with contextlib.suppress(PeftregError):  # the server expires abandoned sessions anyway
        http.request("DELETE", location, ok=(404,))


def _stream_session(
    http: HttpSession, location: str, reader: HashingReader, progress: Progress
) -> str:
    """Send the whole file in one `PATCH`; after a break, continue at the server's offset.

    Where the session can (`HttpSession.send_file`), the kernel sends the body
    from the file while a thread hashes it; otherwise it streams through
    httpx, read ahead and hashed on the way.
    """
    if http.can_send_file(location):
        return _send_file_session(http, location, reader, progress)
    size = reader.size

    def send(offset: int, sent: _Sent) -> httpx.Response:
        blocks = reader.blocks(offset)

        def body() -> Iterator[bytes]:
            for block in blocks:
                yield block
                sent.advance(len(block))

        try:
            return http.request(
                "PATCH",
                location,
                content=body(),
                headers={
                    "Content-Type": OCTET_STREAM,
                    "Content-Length": str(size - offset),
                    "Content-Range": f"{offset}-{size - 1}",
                },
                idempotent=False,
            )
        finally:
            blocks.close()

    location = _patch_session(http, location, size, progress, send)
    if reader.hashed < size:
        # The server had everything after a break: read the rest for the hash.
        for _block in reader.blocks(reader.hashed):
            pass
    return location


def _send_file_session(
    http: HttpSession, location: str, reader: HashingReader, progress: Progress
) -> str:
    """`_stream_session` with the body sent by the kernel while a thread hashes the file."""
    size = reader.size
    failed: list[BaseException] = []
    stop = threading.Event()

    def hash_all() -> None:
        try:
            reader.hash_rest(stop)
        except BaseException as exc:  # raised on the sending thread
            failed.append(exc)

    hashing = threading.Thread(target=hash_all, name="peftreg-hash", daemon=True)
    hashing.start()
    try:
        with reader.path.open("rb") as file:

            def send(offset: int, sent: _Sent) -> httpx.Response:
                return http.send_file(
                    "PATCH",
                    location,
                    file,
                    offset,
                    size - offset,
                    headers={"Content-Type": OCTET_STREAM, "Content-Range": f"{offset}-{size - 1}"},
                    sent=sent.advance,
                )

            location = _patch_session(http, location, size, progress, send)
    except BaseException:
        stop.set()
        raise
    finally:
        hashing.join()
    if failed:
        raise failed[0]
    return location


class _Sent:
    """Bytes of a session's body told to the progress bar so far."""

    def __init__(self, progress: Progress) -> None:
        self.reported = 0
        self._progress = progress

    def advance(self, nbytes: int) -> None:
        self.reported += nbytes
        self._progress.advance(nbytes)

    def resume_at(self, offset: int) -> None:
        self._progress.advance(offset - self.reported)
        self.reported = offset


def _patch_session(
    http: HttpSession,
    location: str,
    size: int,
    progress: Progress,
    send: Callable[[int, _Sent], httpx.Response],
) -> str:
    """`PATCH` until the session holds `size` bytes; the session's last location.

    `send(offset, sent)` sends the body from `offset` and answers the
    response. After a break, the next one starts at the server's offset.
    """
    sent = _Sent(progress)
    offset = failures = 0
    while offset < size:
        try:
            response = send(offset, sent)
        except (TransportError, RangeNotSatisfiable, Conflict) as exc:
            if failures >= http.retries:
                raise
            failures += 1
            offset = _resume_at(http, location, exc, failures)
            sent.resume_at(offset)
            continue
        location = response.headers.get("location", location)
        offset = size
    return location


def _resume_at(http: HttpSession, location: str, exc: PeftregError, failures: int) -> int:
    """Where a session's next `PATCH` starts after failure number `failures` (from 1)."""
    if isinstance(exc, RangeNotSatisfiable) and exc.offset is not None:
        return exc.offset
    # A break, or the server still closing the broken request's write: ask it.
    time.sleep(http.delay(failures - 1))
    return session_offset(http, location)


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
