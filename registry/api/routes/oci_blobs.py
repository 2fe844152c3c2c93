"""OCI blobs: HEAD/GET (with Range, or a redirect to the store) and DELETE.

A GET of a blob the store keeps as a local file (the filesystem store) is
sent by the kernel from the file to the socket where the server offers the
`peftreg.sendfile` extension (`peftreg serve` does, on plain HTTP:
`peftreg.registry.zero_copy`). Otherwise the bytes go through Python, read
4 MiB at a time on a worker thread; the S3 store redirects clients to the
store where that is configured.
"""

from __future__ import annotations

import re
from datetime import timedelta
from functools import partial
from typing import BinaryIO

from fastapi import APIRouter, Request, Response
from fastapi.responses import RedirectResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.types import Receive, Scope, Send

from peftreg.registry.api.caching import content_cache_headers
from peftreg.registry.api.deps import (
    PrincipalDep,
    ServicesDep,
    authorize,
    in_read_statements,
    in_transaction,
)
from peftreg.registry.api.openapi import BLOB_BYTES, OCTET_STREAM, body, failures, no_body
from peftreg.registry.api.sendfile import offers_sendfile, sendfile_message
from peftreg.registry.catalog import blobs
from peftreg.registry.catalog.repositories import valid_name
from peftreg.registry.errors import (
    BlobUnknown,
    DigestInvalid,
    NameInvalid,
    NameUnknown,
    RangeInvalid,
)
from peftreg.registry.storage.errors import BlobNotFound

router = APIRouter()
BLOB_BYTES_SCHEMA = {"type": "string", "format": "binary"}
_RANGE_RE = re.compile(r"bytes=([0-9]*)-([0-9]*)")  # matched whole (`fullmatch`)


class SendfileResponse(Response):
    """Bytes `[start, end)` of an open file, sent by the server's `peftreg.sendfile`."""

    def __init__(
        self, file: BinaryIO, start: int, end: int, status_code: int, headers: dict[str, str]
    ) -> None:
        super().__init__(status_code=status_code, headers=headers)
        self.file, self.start, self.end = file, start, end

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": self.status_code,
                    "headers": self.raw_headers,
                }
            )
            await send(sendfile_message(self.file, self.start, self.end - self.start))
        finally:
            self.file.close()


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """`[start, end)` of a single-range `Range` header, or None for the whole blob."""
    if not header:
        return None
    match = _RANGE_RE.fullmatch(header.strip())
    if match is None or match.group(1) == match.group(2) == "":
        raise RangeInvalid(f"unsupported Range header {header!r}", current_size=size)
    first, last = match.group(1), match.group(2)
    if first == "":
        start, end = max(0, size - int(last)), size
    else:
        start = int(first)
        end = min(size, int(last) + 1) if last else size
    if start >= size or start >= end:
        raise RangeInvalid(
            f"range {header!r} is outside the blob's {size} bytes", current_size=size
        )
    return start, end


@router.api_route(
    "/v2/{name:path}/blobs/{digest}",
    methods=["GET", "HEAD"],
    response_class=Response,
    responses={
        200: BLOB_BYTES,
        206: body("The requested range of the blob", (OCTET_STREAM,), BLOB_BYTES_SCHEMA),
        307: no_body("Fetch the bytes from the blob store", Location="A presigned URL"),
        **failures(NameInvalid, NameUnknown, DigestInvalid, BlobUnknown, RangeInvalid),
    },
)
async def get_blob(
    name: str, digest: str, request: Request, services: ServicesDep, principal: PrincipalDep
) -> Response:
    valid_name(name)
    authorize(principal, "read", name)
    parsed = blobs.parse_digest(digest)
    if request.method == "HEAD":
        # How clients decide to skip an upload: it refreshes the blob for GC.
        grace = timedelta(seconds=services.settings.gc_grace_seconds)
        lookup = partial(blobs.head_blob, repository=name, digest=parsed, grace=grace)
        size = await in_transaction(services, lookup)
    else:
        lookup = partial(blobs.linked_size, repository=name, digest=parsed)
        size = await in_read_statements(services, lookup)
    headers = {
        "Docker-Content-Digest": str(parsed),
        "Accept-Ranges": "bytes",
        "Content-Type": "application/octet-stream",
        **content_cache_headers(str(parsed), immutable=True),
    }
    byte_range = parse_range(request.headers.get("range"), size)
    redirect = services.store.redirect_url(parsed) if request.method == "GET" else None
    if redirect is not None:
        return RedirectResponse(redirect, status_code=307, headers=headers)
    if request.method == "HEAD":
        return Response(status_code=200, headers={**headers, "Content-Length": str(size)})
    start, end = byte_range if byte_range is not None else (0, size)
    headers["Content-Length"] = str(end - start)
    status = 200
    if byte_range is not None:
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    try:
        if offers_sendfile(request.scope):
            local = await run_in_threadpool(services.store.local_file, parsed)
            if local is not None:
                return SendfileResponse(local, start, end, status, headers)
        # Opening the blob is the backend's request (an S3 GetObject): off the loop.
        chunks = await run_in_threadpool(services.store.read, parsed, start, end)
    except BlobNotFound:
        # Linked a moment ago, collected since: the same answer as after the collection.
        raise BlobUnknown(
            f"blob {parsed} is not in {name}", detail={"digest": str(parsed)}
        ) from None
    return StreamingResponse(chunks, status_code=status, headers=headers)


@router.delete(
    "/v2/{name:path}/blobs/{digest}",
    status_code=202,
    response_class=Response,
    responses={
        202: no_body("Unlinked from the repository"),
        **failures(NameInvalid, NameUnknown, DigestInvalid, BlobUnknown),
    },
)
async def delete_blob(
    name: str, digest: str, services: ServicesDep, principal: PrincipalDep
) -> Response:
    valid_name(name)
    authorize(principal, "admin", name)
    parsed = blobs.parse_digest(digest)
    await in_transaction(
        services,
        partial(blobs.delete_blob_link, principal=principal, repository=name, digest=parsed),
    )
    return Response(status_code=202)
