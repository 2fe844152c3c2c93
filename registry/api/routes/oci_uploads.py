"""OCI upload sessions: POST (start, monolithic, mount), PATCH, PUT, GET, DELETE."""

from __future__ import annotations

import asyncio
import logging
import re
from functools import partial

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from peftreg.digest import Digest
from peftreg.registry.api.deps import PrincipalDep, ServicesDep, authorize, in_transaction
from peftreg.registry.api.openapi import CREATED_BLOB, UPLOAD_PROGRESS, failures, no_body
from peftreg.registry.api.receive_into import ReceiveInto, receive_into_of
from peftreg.registry.auth.scopes import Principal
from peftreg.registry.catalog import blobs
from peftreg.registry.catalog.repositories import valid_name
from peftreg.registry.errors import (
    BlobUploadInvalid,
    BlobUploadUnknown,
    DigestInvalid,
    NameInvalid,
    NameUnknown,
    RangeInvalid,
    UploadInUse,
)
from peftreg.registry.state import Services
from peftreg.registry.storage.base import BlobWriter, UploadWriter
from peftreg.registry.storage.errors import (
    StorageError,
    UploadBusy,
    UploadNotFound,
    UploadOffsetMismatch,
)

logger = logging.getLogger(__name__)
router = APIRouter()
WRITE_BUFFER = 4 * 1024 * 1024
_CONTENT_RANGE_RE = re.compile(r"(?:bytes[ =])?([0-9]+)-([0-9]+)(?:/\S+)?")  # matched whole


def _location(name: str, upload_id: str) -> str:
    return f"/v2/{name}/blobs/uploads/{upload_id}"


def _progress_headers(name: str, upload_id: str, size: int) -> dict[str, str]:
    return {
        "Location": _location(name, upload_id),
        "Range": f"0-{max(size - 1, 0)}",
        "Docker-Upload-UUID": upload_id,
        "Content-Length": "0",
    }


def _created(name: str, digest: str) -> Response:
    return Response(
        status_code=201,
        headers={
            "Location": f"/v2/{name}/blobs/{digest}",
            "Docker-Content-Digest": digest,
            "Content-Length": "0",
        },
    )


async def receive_body(
    services: Services, request: Request, upload_id: str, offset: int | None
) -> int:
    """Append the request body to an upload session; returns the new size.

    If the client disconnects, what arrived stays in the session (a client
    can ask for the offset and resume) but nothing becomes visible as a blob.
    """
    store = services.store
    current = await run_in_threadpool(_size_or_unknown, services, upload_id)
    start = current if offset is None else offset
    try:
        writer = await run_in_threadpool(store.open_writer, upload_id, start)
    except UploadOffsetMismatch as exc:
        raise RangeInvalid(
            f"chunk starts at {exc.given} but upload {upload_id} holds {exc.expected} bytes",
            current_size=exc.expected,
        ) from None
    except UploadBusy as exc:
        raise UploadInUse(str(exc), detail={"upload": upload_id}) from None
    return await _stream_into(request, writer)


async def receive_blob(services: Services, request: Request, digest: Digest) -> BlobWriter:
    """The request body as the blob `digest`, ready to publish (`BlobStore.open_blob`).

    For a body that comes with its digest: a monolithic POST, or a PUT that
    sends the whole blob into an empty session. The store may write it where
    the blob will live, sparing the copy a session's commit can cost. A body
    cut short leaves nothing: a monolithic upload is sent again whole.
    """
    writer = await run_in_threadpool(services.store.open_blob, digest)
    try:
        await _stream_into(request, writer)
    except BaseException:
        await run_in_threadpool(writer.cancel)
        raise
    return writer


async def _publish(
    services: Services,
    writer: BlobWriter,
    principal: Principal,
    name: str,
    digest: Digest,
    upload_id: str | None = None,
) -> None:
    """Publish a received blob and link it (closing the empty session `upload_id`)."""
    try:
        await in_transaction(
            services,
            partial(
                blobs.publish_blob,
                writer=writer,
                principal=principal,
                repository=name,
                digest=digest,
                upload_id=upload_id,
            ),
        )
    finally:
        await run_in_threadpool(writer.cancel)  # nothing left to drop once published
    if upload_id is not None:
        await run_in_threadpool(_drop_session, services, upload_id)


def _drop_session(services: Services, upload_id: str) -> None:
    """Remove the (empty) store session a published PUT came through; GC would, later."""
    try:
        services.store.abort_upload(upload_id)
    except (StorageError, OSError):
        logger.warning("could not remove upload session %s", upload_id, exc_info=True)


def _whole_body(request: Request) -> bool:
    """Whether a PUT carries bytes and no `Content-Range` (then they are the whole blob)."""
    headers = request.headers
    if "content-range" in headers:
        return False
    length = headers.get("content-length")
    return (length is not None and length.strip() != "0") or "chunked" in headers.get(
        "transfer-encoding", ""
    ).lower()


async def _stream_into(request: Request, writer: UploadWriter) -> int:
    """Hand the request body to `writer` and close it; returns the size it reports.

    Where the server offers it and the store keeps a local file, the body
    goes from the socket into the file in the kernel. Otherwise bytes are
    buffered and written on a worker thread, so the event loop only moves
    memory. A client that disconnects raises `ClientDisconnect` after the
    writer kept (closed) what arrived.
    """
    receive_into = receive_into_of(request.scope)
    fd = None if receive_into is None else writer.local_fd()
    if receive_into is not None and fd is not None:
        return await _receive_into_file(receive_into, fd, writer)
    buffer: list[bytes] = []
    buffered = 0
    in_flight: asyncio.Future[None] | None = None
    try:
        async for chunk in request.stream():
            buffer.append(chunk)
            buffered += len(chunk)
            if buffered >= WRITE_BUFFER:
                # One write in flight while the next buffer fills: network
                # input and disk output (and hashing) overlap, writes stay in order.
                if in_flight is not None:
                    await in_flight
                in_flight = asyncio.ensure_future(run_in_threadpool(writer.write_many, buffer))
                buffer, buffered = [], 0
        if in_flight is not None:
            await in_flight
            in_flight = None
        if buffer:
            await run_in_threadpool(writer.write_many, buffer)
    except ClientDisconnect:
        # Keep everything that arrived, buffered bytes included, so the client
        # resumes from there; unless a write failed, then drop this request's.
        if await _settle(in_flight):
            if buffer:
                await run_in_threadpool(writer.write_many, buffer)
            await run_in_threadpool(writer.close)
        else:
            await run_in_threadpool(writer.cancel)
        raise
    except BaseException:
        await _settle(in_flight)
        await run_in_threadpool(writer.cancel)
        raise
    return await run_in_threadpool(writer.close)


async def _receive_into_file(receive_into: ReceiveInto, fd: int, writer: UploadWriter) -> int:
    """The body written into the session's file by the server, from the socket in the
    kernel (`peftreg.registry.api.receive_into`); what landed stays if the client goes."""
    try:
        complete = await receive_into(fd, writer.appended)
    except BaseException:
        await run_in_threadpool(writer.cancel)
        raise
    size = await run_in_threadpool(writer.close)
    if not complete:
        raise ClientDisconnect()
    return size


async def _settle(write: asyncio.Future[None] | None) -> bool:
    """Wait for a pending write; returns whether it (or no write) succeeded."""
    if write is None:
        return True
    try:
        await write
    except Exception:
        return False
    return True


def _size_or_unknown(services: Services, upload_id: str) -> int:
    try:
        return services.store.upload_size(upload_id)
    except UploadNotFound:
        raise BlobUploadUnknown(
            f"upload {upload_id} does not exist", detail={"upload": upload_id}
        ) from None


async def _chunk_offset(services: Services, request: Request, upload_id: str) -> int | None:
    """Where the chunk's `Content-Range` says it starts (None: at the current end)."""
    header = request.headers.get("content-range")
    if not header:
        return None
    match = _CONTENT_RANGE_RE.fullmatch(header.strip())
    if match is None:
        raise BlobUploadInvalid(f"malformed Content-Range {header!r}; expected <start>-<end>")
    start, end = int(match.group(1)), int(match.group(2))
    if end < start:
        current = await run_in_threadpool(_size_or_unknown, services, upload_id)
        raise RangeInvalid(f"Content-Range {header!r} ends before it starts", current_size=current)
    return start


@router.post(
    "/v2/{name:path}/blobs/uploads/",
    status_code=202,
    response_class=Response,
    responses={
        201: CREATED_BLOB,
        202: UPLOAD_PROGRESS,
        **failures(NameInvalid, DigestInvalid, BlobUploadInvalid, UploadInUse, RangeInvalid),
    },
)
async def start_upload(
    name: str, request: Request, services: ServicesDep, principal: PrincipalDep
) -> Response:
    valid_name(name)
    authorize(principal, "write", name)
    mount, source = request.query_params.get("mount"), request.query_params.get("from")
    if mount is not None:
        blobs.parse_digest(mount)
    if source is not None:
        valid_name(source)
    if mount and source and principal.can("read", source):
        digest = blobs.parse_digest(mount)
        mounted = await in_transaction(
            services,
            partial(
                blobs.mount_blob,
                principal=principal,
                repository=name,
                digest=digest,
                source=source,
            ),
        )
        if mounted is not None:
            return _created(name, str(digest))
    digest_param = request.query_params.get("digest")
    if digest_param is None:
        upload_id = await in_transaction(
            services,
            partial(blobs.start_upload, store=services.store, principal=principal, repository=name),
        )
        return Response(status_code=202, headers=_progress_headers(name, upload_id, 0))
    digest = blobs.parse_digest(digest_param)
    writer = await receive_blob(services, request, digest)
    await _publish(services, writer, principal, name, digest)
    return _created(name, str(digest))


@router.patch(
    "/v2/{name:path}/blobs/uploads/{upload_id}",
    status_code=202,
    response_class=Response,
    responses={
        202: UPLOAD_PROGRESS,
        **failures(
            NameInvalid,
            NameUnknown,
            BlobUploadUnknown,
            BlobUploadInvalid,
            UploadInUse,
            RangeInvalid,
        ),
    },
)
async def patch_upload(
    name: str, upload_id: str, request: Request, services: ServicesDep, principal: PrincipalDep
) -> Response:
    valid_name(name)
    authorize(principal, "write", name)
    await in_transaction(
        services, partial(blobs.check_upload, repository=name, upload_id=upload_id)
    )
    size = await receive_body(
        services, request, upload_id, await _chunk_offset(services, request, upload_id)
    )
    await in_transaction(services, partial(blobs.touch_upload, upload_id=upload_id))
    return Response(status_code=202, headers=_progress_headers(name, upload_id, size))


@router.put(
    "/v2/{name:path}/blobs/uploads/{upload_id}",
    status_code=201,
    response_class=Response,
    responses={
        201: CREATED_BLOB,
        **failures(
            NameInvalid,
            NameUnknown,
            BlobUploadUnknown,
            BlobUploadInvalid,
            UploadInUse,
            RangeInvalid,
            DigestInvalid,
        ),
    },
)
async def finish_upload(
    name: str, upload_id: str, request: Request, services: ServicesDep, principal: PrincipalDep
) -> Response:
    valid_name(name)
    authorize(principal, "write", name)
    digest_param = request.query_params.get("digest")
    if digest_param is None:
        raise BlobUploadInvalid("completing an upload needs the 'digest' query parameter")
    digest = blobs.parse_digest(digest_param)
    await in_transaction(
        services, partial(blobs.check_upload, repository=name, upload_id=upload_id)
    )
    if _whole_body(request) and await run_in_threadpool(_size_or_unknown, services, upload_id) == 0:
        # The whole blob in the closing PUT (as oras sends it): a monolithic upload.
        writer = await receive_blob(services, request, digest)
        await _publish(services, writer, principal, name, digest, upload_id)
        return _created(name, str(digest))
    await receive_body(
        services, request, upload_id, await _chunk_offset(services, request, upload_id)
    )
    await in_transaction(
        services,
        partial(
            blobs.finish_upload,
            store=services.store,
            principal=principal,
            repository=name,
            upload_id=upload_id,
            digest=digest,
        ),
    )
    return _created(name, str(digest))


@router.get(
    "/v2/{name:path}/blobs/uploads/{upload_id}",
    status_code=204,
    response_class=Response,
    responses={204: UPLOAD_PROGRESS, **failures(NameInvalid, NameUnknown, BlobUploadUnknown)},
)
async def upload_status(
    name: str, upload_id: str, services: ServicesDep, principal: PrincipalDep
) -> Response:
    valid_name(name)
    authorize(principal, "write", name)
    await in_transaction(
        services, partial(blobs.check_upload, repository=name, upload_id=upload_id)
    )
    size = await run_in_threadpool(_size_or_unknown, services, upload_id)
    return Response(status_code=204, headers=_progress_headers(name, upload_id, size))


@router.delete(
    "/v2/{name:path}/blobs/uploads/{upload_id}",
    status_code=204,
    response_class=Response,
    responses={
        204: no_body("Upload cancelled"),
        **failures(NameInvalid, NameUnknown, BlobUploadUnknown, UploadInUse),
    },
)
async def cancel_upload(
    name: str, upload_id: str, services: ServicesDep, principal: PrincipalDep
) -> Response:
    valid_name(name)
    authorize(principal, "write", name)
    await in_transaction(
        services,
        partial(blobs.cancel_upload, store=services.store, repository=name, upload_id=upload_id),
    )
    return Response(status_code=204)
