"""Garbage collection: blobs no manifest names, and expired upload sessions.

`collect_garbage` removes (or, dry, only reports):

1. blobs that no manifest of any repository references and that nobody
   uploaded, mounted or HEAD-checked within the grace period, with their
   per-repository links;
2. store objects that have no blob row (left by a crash between a store
   commit and its transaction, or between the two steps below);
3. upload sessions idle for longer than the upload expiry (and the grace),
   rows and bytes, and store sessions without a row that are as old.

It may run at any time, from any number of processes (`peftreg gc`, the
server's periodic thread, several replicas), while clients push and pull.

Why a concurrent push is never broken
-------------------------------------

The invariant: *a blob row exists only while the store holds its bytes*, and
a manifest is accepted only if every blob it names has a row (linked in its
repository). GC keeps it by deleting in two steps, the row first:

A. In one transaction, candidate rows (unreferenced, `touched_at` older than
   the grace period) are locked `FOR UPDATE SKIP LOCKED` (PostgreSQL), then
   re-checked by a second statement, which in READ COMMITTED sees everything
   committed before the locks were granted, and deleted with their links.
   On SQLite every transaction is `BEGIN IMMEDIATE`: the single writer lock
   gives the same exclusion.
B. After that commit, for each digest: in a new transaction holding the
   digest's lock (`registry.catalog.blobs.lock_digest`: an advisory lock on
   PostgreSQL, the writer lock on SQLite), the bytes are deleted only if
   there is still no row.

The races, one by one:

- *HEAD (or mount) says "exists", the client skips the upload, GC deletes
  the blob before the manifest PUT.* HEAD and mount update `touched_at`
  (`touch_blob`), which locks the row. If GC locked it first, the touch
  waits, finds the row deleted and HEAD answers 404, so the client uploads.
  Otherwise the row is now younger than the grace period, and step A skips
  a locked row and re-checks `touched_at` of the ones it got. The client
  has the whole grace period (24 h by default) to PUT its manifest.
- *Manifest PUT naming a blob while GC deletes it.* The PUT reads the blob
  rows `FOR SHARE`: GC's `SKIP LOCKED` passes over them, and its re-check
  sees the manifest's references once it commits. If GC locked a row first,
  the PUT waits and then finds no row: `MANIFEST_BLOB_UNKNOWN`, which only
  happens to a blob nobody touched within the grace period.
- *Upload commit while GC scans.* The store commit of an upload is a no-op
  when the bytes are already there, and the row is inserted afterwards. Both
  happen in one transaction holding the digest's lock, which step B also
  takes: either B deleted the bytes first (then the upload writes them
  afresh), or the upload's row is committed when B looks (then B keeps the
  bytes). A row deleted by step A while the upload runs is inserted again by
  the upload (it waits for A's commit), and B then sees that row.
- *GC crashing between A and B* leaves bytes without a row: step 2 above
  (orphans) removes them on the next run, under the same lock and check.

Bytes are thus deleted only after the row deletion committed, and only while
no row exists. Upload sessions: a session row is deleted (and its bytes
discarded) only once idle past the expiry; a session being written at that
moment (`UploadBusy`) is left alone.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, exists, select
from sqlalchemy.orm import Session

from client.digest import Digest, InvalidDigest
from registry.catalog import audit
from registry.catalog.blobs import lock_digest
from registry.db.models import Blob, ManifestReference, RepositoryBlob, UploadSession
from registry.state import Services
from registry.storage.errors import BlobNotFound, StorageError, UploadBusy

logger = logging.getLogger(__name__)

BATCH = 500
ACTOR = "gc"


@dataclass
class GcReport:
    dry_run: bool
    grace_seconds: float
    blobs_removed: int = 0
    bytes_reclaimed: int = 0
    """Bytes of the blobs and orphaned objects removed from the store."""
    repository_links_removed: int = 0
    orphans_removed: int = 0
    """Store objects that had no blob row."""
    uploads_removed: int = 0
    blobs_spared: int = 0
    """Blobs deleted from the database whose bytes a concurrent upload claimed again."""
    duration_seconds: float = 0.0
    removed: list[str] = field(default_factory=list)
    """Digests whose bytes were (or, dry, would be) removed: blobs and orphans."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> dict[str, Any]:
        """The report without the digest list (for the audit log and logs)."""
        return {key: value for key, value in self.as_dict().items() if key != "removed"}


def collect_garbage(
    services: Services,
    *,
    dry_run: bool,
    grace: timedelta,
    actor: str = ACTOR,
    batch: int = BATCH,
) -> GcReport:
    """Remove what nothing references and nobody used within `grace`; see the module doc."""
    if grace < timedelta(0):
        raise ValueError("the grace period cannot be negative")
    started = time.perf_counter()
    now = datetime.now(UTC)
    report = GcReport(dry_run=dry_run, grace_seconds=grace.total_seconds())
    _collect_blobs(services, report, cutoff=now - grace, batch=batch)
    _collect_orphans(services, report)
    expiry = max(timedelta(seconds=services.settings.upload_expiry_seconds), grace)
    _collect_uploads(services, report, cutoff=now - expiry)
    report.duration_seconds = round(time.perf_counter() - started, 3)
    if not dry_run:
        with services.transaction() as session:
            audit.record(session, actor=actor, action="gc.run", detail=report.summary())
    logger.info(
        "garbage collection %s: %d blobs, %d bytes, %d uploads",
        "(dry run) would remove" if dry_run else "removed",
        report.blobs_removed + report.orphans_removed,
        report.bytes_reclaimed,
        report.uploads_removed,
        extra={"gc": report.summary()},
    )
    return report


def run_periodic_gc(services: Services, stop: threading.Event) -> None:
    """Collect garbage every `gc_interval_seconds` until `stop` is set (a server thread)."""
    interval = services.settings.gc_interval_seconds
    if interval <= 0:
        return
    grace = timedelta(seconds=services.settings.gc_grace_seconds)
    while not stop.wait(interval):
        try:
            report = collect_garbage(services, dry_run=False, grace=grace)
        except Exception:
            logger.exception("periodic garbage collection failed")
            services.metrics.observe_gc(outcome="failed")
        else:
            services.metrics.observe_gc(outcome="ok", bytes_reclaimed=report.bytes_reclaimed)


# blobs ------------------------------------------------------------------------


def _unreferenced(cutoff: datetime) -> Any:
    return (Blob.touched_at < cutoff) & ~exists().where(ManifestReference.digest == Blob.digest)


def _collect_blobs(services: Services, report: GcReport, *, cutoff: datetime, batch: int) -> None:
    after: str | None = ""
    while after is not None:
        with services.transaction() as session:
            chosen, after = _delete_rows(
                session, cutoff=cutoff, after=after, batch=batch, report=report
            )
        for digest, size in chosen:
            if report.dry_run or _delete_bytes(services, digest):
                report.blobs_removed += 1
                report.bytes_reclaimed += size
                report.removed.append(digest)
            else:
                report.blobs_spared += 1


def _delete_rows(
    session: Session, *, cutoff: datetime, after: str, batch: int, report: GcReport
) -> tuple[list[tuple[str, int]], str | None]:
    """Step A for the next batch of digests after `after`.

    Returns the (digest, size) of the rows deleted (dry: that would be), and
    where the next batch starts, or None when no candidate is left.
    """
    query = (
        select(Blob.digest)
        .where(Blob.digest > after, _unreferenced(cutoff))
        .order_by(Blob.digest)
        .limit(batch)
    )
    if not report.dry_run:
        query = query.with_for_update(skip_locked=True)
    candidates = list(session.scalars(query))
    if not candidates:
        return [], None
    # A second statement: it sees every commit made before the locks were granted.
    rows = session.execute(
        select(Blob.digest, Blob.size)
        .where(Blob.digest.in_(candidates), _unreferenced(cutoff))
        .order_by(Blob.digest)
    ).all()
    chosen = [(digest, int(size)) for digest, size in rows]
    digests = [digest for digest, _ in chosen]
    if report.dry_run:
        links = session.scalars(
            select(RepositoryBlob.digest).where(RepositoryBlob.digest.in_(digests))
        )
        report.repository_links_removed += len(list(links))
    elif digests:
        unlinked = session.execute(delete(RepositoryBlob).where(RepositoryBlob.digest.in_(digests)))
        report.repository_links_removed += int(getattr(unlinked, "rowcount", 0) or 0)
        session.execute(delete(Blob).where(Blob.digest.in_(digests)))
    return chosen, candidates[-1]


def _delete_bytes(services: Services, digest: str) -> bool:
    """Step B: delete the bytes unless a row exists again; whether they went."""
    parsed = Digest.parse(digest)
    with services.transaction() as session:
        lock_digest(session, parsed)
        if session.get(Blob, digest) is not None:
            return False
        # Absent: deleted by a GC running concurrently, or never there.
        with suppress(BlobNotFound):
            services.store.delete(parsed)
    return True


# orphaned objects ---------------------------------------------------------------


def _store_digests(services: Services) -> Iterator[Digest]:
    try:
        yield from services.store.list_digests()
    except InvalidDigest:
        logger.warning("the blob store lists a key that is not a digest", exc_info=True)


def _collect_orphans(services: Services, report: GcReport) -> None:
    with services.transaction() as session:
        known = set(session.scalars(select(Blob.digest)))
    for digest in list(_store_digests(services)):
        if str(digest) in known:
            continue
        try:
            size = services.store.stat(digest)
        except BlobNotFound:
            continue
        if report.dry_run or _delete_bytes(services, str(digest)):
            report.orphans_removed += 1
            report.bytes_reclaimed += size
            report.removed.append(str(digest))


# upload sessions ----------------------------------------------------------------


def _store_uploads(services: Services, attempts: int = 3) -> list[tuple[str, datetime]]:
    """The store's upload sessions; empty (logged) if listing keeps failing.

    Sessions come and go while the store is listed (a commit removes its
    session), which a backend may report as an error: the listing is retried.
    """
    for attempt in range(1, attempts + 1):
        try:
            return list(services.store.list_uploads())
        except (OSError, StorageError):
            if attempt == attempts:
                logger.warning("cannot list the store's upload sessions", exc_info=True)
    return []


def _collect_uploads(services: Services, report: GcReport, *, cutoff: datetime) -> None:
    with services.transaction() as session:
        query = select(UploadSession).where(UploadSession.updated_at < cutoff)
        if not report.dry_run:
            query = query.with_for_update(skip_locked=True)
        for row in list(session.scalars(query)):
            if report.dry_run:
                report.uploads_removed += 1
                continue
            try:
                services.store.abort_upload(row.id)
            except UploadBusy:
                continue  # being written right now: not idle after all
            session.delete(row)
            report.uploads_removed += 1
        known = set(session.scalars(select(UploadSession.id)))
    for upload_id, written in _store_uploads(services):
        if upload_id in known or written >= cutoff:
            continue
        if not report.dry_run:
            try:
                services.store.abort_upload(upload_id)
            except UploadBusy:
                continue
        report.uploads_removed += 1
