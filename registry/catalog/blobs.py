"""Blobs as repositories see them: linked by upload or mount, verified by the store.

Every upload and mount refreshes the blob's `touched_at`, and so does an
existence check (HEAD) of a blob last touched more than half the grace
period ago; an upload's store commit runs under the digest's lock
(`lock_digest`): together they are what lets garbage collection run while
clients push (the argument is in `peftreg.registry.maintenance.gc`).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from sqlalchemy import exists, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from peftreg.digest import Digest, InvalidDigest
from peftreg.registry.auth.scopes import Principal
from peftreg.registry.catalog import audit
from peftreg.registry.catalog.repositories import ensure_repository, find_repository
from peftreg.registry.db.models import Blob, RepositoryBlob, UploadSession
from peftreg.registry.db.upsert import insert_ignore
from peftreg.registry.errors import (
    BlobUnknown,
    BlobUploadUnknown,
    DigestInvalid,
    NameInvalid,
    NameUnknown,
    UploadInUse,
)
from peftreg.registry.storage.base import BlobStore, BlobWriter
from peftreg.registry.storage.errors import DigestMismatch, UploadBusy, UploadNotFound


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


# PostgreSQL advisory locks take two int4 keys: this namespace ("peft"), and
# 32 bits of the digest. Digests sharing those bits only wait for each other.
_DIGEST_LOCK_NAMESPACE = 0x70656674


def lock_digest(session: Session, digest: Digest) -> None:
    """Hold the digest's lock to the end of the transaction.

    Taken around anything that makes a blob's bytes visible in the store or
    removes them: an upload's commit (`finish_upload`, `publish_blob`) and garbage
    collection's delete. On SQLite every transaction already holds the
    database's single write lock (`BEGIN IMMEDIATE`), which serialises both.
    """
    if session.get_bind().dialect.name != "postgresql":
        return
    key = int(digest.hex[:8], 16) - (1 << 31)  # a signed int4
    session.execute(
        text("SELECT pg_advisory_xact_lock(:namespace, :key)"),
        {"namespace": _DIGEST_LOCK_NAMESPACE, "key": key},
    )


def touch_blob(
    session: Session,
    *,
    digest: Digest,
    repository_id: int | None = None,
    touched_before: datetime | None = None,
) -> bool:
    """Refresh `touched_at` of a blob (linked in `repository_id`, when given).

    Returns whether a row was refreshed: the blob row exists (and is linked,
    and, with `touched_before`, was last touched before then). The UPDATE
    locks the row to the end of the transaction, so garbage collection, which
    skips locked rows and re-checks `touched_at` after locking, cannot delete
    it now, nor for a grace period after this commits.
    """
    statement = update(Blob).where(Blob.digest == str(digest)).values(touched_at=datetime.now(UTC))
    if touched_before is not None:
        statement = statement.where(Blob.touched_at < touched_before)
    if repository_id is not None:
        statement = statement.where(
            exists().where(
                RepositoryBlob.repository_id == repository_id,
                RepositoryBlob.digest == str(digest),
            )
        )
    result = session.execute(statement.execution_options(synchronize_session=False))
    return bool(getattr(result, "rowcount", 0))


def head_blob(
    session: Session, *, repository: str, digest: Digest, grace: timedelta | None = None
) -> int:
    """Size of a blob the repository may serve, for an existence check; raises `BlobUnknown`.

    A client that finds a blob here skips uploading it and will soon name it
    in a manifest: the check counts as a use. With `grace` (the garbage
    collection grace period), the row is refreshed only when last touched
    more than `grace / 2` ago, which spares a row write per HEAD of a busy
    blob: either way a blob found here stays at least `grace / 2` (without
    `grace`: a whole grace period) out of the collector's reach. A stale row
    is refreshed under its row lock; if garbage collection holds that lock,
    the refresh waits for it, finds the row deleted and this raises.
    """
    repository_id = find_repository(session, name=repository).id
    touched_before = None if grace is None else datetime.now(UTC) - grace / 2
    touch_blob(session, digest=digest, repository_id=repository_id, touched_before=touched_before)
    return linked_size(session, repository=repository, digest=digest)


def link_blob(session: Session, *, repository_id: int, digest: Digest, size: int) -> None:
    """Record a blob the store just committed and link it into a repository.

    Only for bytes committed in this transaction under `lock_digest`: a new
    blob row promises that the store holds the bytes.

    The blob row is upserted (`ON CONFLICT DO UPDATE` refreshing
    `touched_at`), never "inserted unless present": if garbage collection
    holds the existing row locked to delete it, PostgreSQL waits for that
    commit and then inserts the row afresh, instead of finding a row that is
    about to vanish and linking the repository to nothing.
    """
    module = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    upsert = module.insert(Blob).values(digest=str(digest), size=size, touched_at=datetime.now(UTC))
    session.execute(
        upsert.on_conflict_do_update(
            index_elements=[Blob.digest], set_={"touched_at": upsert.excluded.touched_at}
        )
    )
    insert_ignore(session, RepositoryBlob, repository_id=repository_id, digest=str(digest))


def mount_blob(
    session: Session, *, principal: Principal, repository: str, digest: Digest, source: str
) -> int | None:
    """Link a blob from `source` into `repository`; None when `source` lacks it.

    The blob row is touched, never created: a row that garbage collection
    deleted a moment ago stays deleted and the client uploads the bytes.
    """
    try:
        size = linked_size(session, repository=source, digest=digest)
    except (BlobUnknown, NameUnknown, NameInvalid):
        return None
    if not touch_blob(session, digest=digest):
        return None
    target = ensure_repository(session, name=repository)
    insert_ignore(session, RepositoryBlob, repository_id=target.id, digest=str(digest))
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
    to it; the blob row and repository link follow in this transaction,
    under the digest's lock, so garbage collection cannot delete the bytes
    between the store finding them already present and the row's commit.
    """
    row = check_upload(session, repository=repository, upload_id=upload_id)
    try:
        size = _publish(
            session,
            lambda: store.commit_upload(upload_id, digest),
            principal=principal,
            repository=repository,
            repository_id=row.repository_id,
            digest=digest,
        )
    except UploadBusy as exc:
        raise UploadInUse(str(exc), detail={"upload": upload_id}) from None
    session.delete(row)
    return size


def publish_blob(
    session: Session,
    *,
    writer: BlobWriter,
    principal: Principal,
    repository: str,
    digest: Digest,
    upload_id: str | None = None,
) -> int:
    """Publish a monolithic upload's blob (`BlobStore.open_blob`); returns its size.

    As `finish_upload`, under the digest's lock. The bytes came whole, with
    their digest, in one request: a POST, which opened no session, or the PUT
    closing the empty session `upload_id`, whose row goes with the publication.
    """
    if upload_id is None:
        repository_id = ensure_repository(session, name=repository).id
        row = None
    else:
        row = check_upload(session, repository=repository, upload_id=upload_id)
        repository_id = row.repository_id
    size = _publish(
        session,
        writer.publish,
        principal=principal,
        repository=repository,
        repository_id=repository_id,
        digest=digest,
    )
    if row is not None:
        session.delete(row)
    return size


def _publish(
    session: Session,
    publish: Callable[[], int],
    *,
    principal: Principal,
    repository: str,
    repository_id: int,
    digest: Digest,
) -> int:
    """Have the store publish the bytes under the digest's lock, then link and record them."""
    lock_digest(session, digest)
    try:
        size = publish()
    except DigestMismatch as exc:
        raise DigestInvalid(
            f"uploaded content does not match digest {digest}: it hashes to {exc.actual}",
            detail={"expected": str(digest), "actual": str(exc.actual), "size": exc.size},
        ) from None
    except UploadNotFound as exc:
        raise BlobUploadUnknown(
            f"upload {exc.upload_id} has no data", detail={"upload": exc.upload_id}
        ) from None
    link_blob(session, repository_id=repository_id, digest=digest, size=size)
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
