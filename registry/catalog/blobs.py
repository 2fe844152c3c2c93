"""Blobs as repositories see them: linked by upload or mount, verified by the store."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from client.digest import Digest, InvalidDigest
from registry.auth.scopes import Principal
from registry.catalog import audit
from registry.catalog.repositories import ensure_repository, find_repository
from registry.db.models import Blob, RepositoryBlob, UploadSession
from registry.db.upsert import insert_ignore
from registry.errors import (
    BlobUnknown,
    BlobUploadUnknown,
    DigestInvalid,
    NameInvalid,
    NameUnknown,
    UploadInUse,
)
from registry.storage.base import BlobStore
from registry.storage.errors import DigestMismatch, UploadBusy, UploadNotFound


def parse_digest(text: str) -> Digest:
    try:
        return Digest.parse(text)
    except InvalidDigest as exc:
        raise DigestInvalid(str(exc), detail={"digest": text}) from None


def linked_size(session: Session, *, repository: str, digest: Digest) -> int:
    """Size of a blob the repository may serve; raises `BlobUnknown`."""
    repository_id = find_repository(session, name=repository).id
    size = session.scalar(
        select(Blob.size)
        .join(RepositoryBlob, RepositoryBlob.digest == Blob.digest)
        .where(RepositoryBlob.digest == str(digest), RepositoryBlob.repository_id == repository_id)
    )
    if size is None:
        raise BlobUnknown(f"blob {digest} is not in {repository}", detail={"digest": str(digest)})
    return int(size)


def link_blob(session: Session, *, repository_id: int, digest: Digest, size: int) -> None:
    insert_ignore(session, Blob, digest=str(digest), size=size)
    insert_ignore(session, RepositoryBlob, repository_id=repository_id, digest=str(digest))


def mount_blob(
    session: Session, *, principal: Principal, repository: str, digest: Digest, source: str
) -> int | None:
    """Link a blob from `source` into `repository`; None when `source` lacks it."""
    try:
        size = linked_size(session, repository=source, digest=digest)
    except (BlobUnknown, NameUnknown, NameInvalid):
        return None
    target = ensure_repository(session, name=repository)
    link_blob(session, repository_id=target.id, digest=digest, size=size)
    audit.record(
        session,
        actor=principal.name,
        action="blob.mount",
        repository=repository,
        target=str(digest),
        detail={"from": source},
    )
    return size


def start_upload(
    session: Session, *, store: BlobStore, principal: Principal, repository: str
) -> str:
    target = ensure_repository(session, name=repository)
    upload_id = store.create_upload()
    now = datetime.now(UTC)
    session.add(
        UploadSession(
            id=upload_id,
            repository_id=target.id,
            created_by=principal.name,
            created_at=now,
            updated_at=now,
        )
    )
    return upload_id


def check_upload(session: Session, *, repository: str, upload_id: str) -> UploadSession:
    row = session.get(UploadSession, upload_id)
    if row is None or row.repository_id != find_repository(session, name=repository).id:
        raise BlobUploadUnknown(
            f"upload {upload_id} is not open in {repository}", detail={"upload": upload_id}
        )
    return row


def touch_upload(session: Session, *, upload_id: str) -> None:
    row = session.get(UploadSession, upload_id)
    if row is not None:
        row.updated_at = datetime.now(UTC)


def finish_upload(
    session: Session,
    *,
    store: BlobStore,
    principal: Principal,
    repository: str,
    upload_id: str,
    digest: Digest,
) -> int:
    """Verify and publish an upload; returns the blob size.

    The store makes the bytes visible under their digest only if they hash
    to it; the blob row and repository link follow in this transaction.
    """
    row = check_upload(session, repository=repository, upload_id=upload_id)
    try:
        size = store.commit_upload(upload_id, digest)
    except DigestMismatch as exc:
        session.delete(row)
        raise DigestInvalid(
            f"uploaded content does not match digest {digest}: it hashes to {exc.actual}",
            detail={"expected": str(digest), "actual": str(exc.actual), "size": exc.size},
        ) from None
    except UploadNotFound:
        session.delete(row)
        raise BlobUploadUnknown(
            f"upload {upload_id} has no data", detail={"upload": upload_id}
        ) from None
    except UploadBusy as exc:
        raise UploadInUse(str(exc), detail={"upload": upload_id}) from None
    link_blob(session, repository_id=row.repository_id, digest=digest, size=size)
    session.delete(row)
    audit.record(
        session,
        actor=principal.name,
        action="blob.upload",
        repository=repository,
        target=str(digest),
        detail={"size": size},
    )
    return size


def cancel_upload(session: Session, *, store: BlobStore, repository: str, upload_id: str) -> None:
    row = check_upload(session, repository=repository, upload_id=upload_id)
    try:
        store.abort_upload(upload_id)
    except UploadBusy as exc:
        raise UploadInUse(str(exc), detail={"upload": upload_id}) from None
    session.delete(row)


def delete_blob_link(
    session: Session, *, principal: Principal, repository: str, digest: Digest
) -> None:
    """Unlink a blob from a repository; the bytes go when garbage collection runs."""
    target = find_repository(session, name=repository)
    link = session.get(RepositoryBlob, (target.id, str(digest)))
    if link is None:
        raise BlobUnknown(f"blob {digest} is not in {repository}", detail={"digest": str(digest)})
    session.delete(link)
    audit.record(
        session,
        actor=principal.name,
        action="blob.delete",
        repository=repository,
        target=str(digest),
    )
