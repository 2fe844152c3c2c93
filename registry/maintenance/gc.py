"""Garbage collection: blobs no manifest names, and expired upload sessions.

`collect_garbage` removes (or, dry, only reports):

1. blobs that no manifest of any repository references and that nobody
   uploaded, mounted or HEAD-checked recently enough (see the grace period
   below), with their per-repository links;
2. store objects that have no blob row (left by a crash between a store
   commit and its transaction, or between the two steps below);
3. upload sessions idle for longer than the upload expiry (and the grace),
   rows and bytes, store sessions without a row that are as old, and
   whole-blob writes begun as long ago and never finished (on S3, unfinished
   multipart uploads under `blobs/` that a dead replica left).

It may run at any time, from any number of processes (`peftreg gc`, the
server's periodic thread, several replicas), while clients push and pull.
Run it only once every API server runs migration 0004 or later: older
servers neither touch blobs nor take the locks below (README, Operations).

The grace period
----------------

A blob is collectable once unreferenced and not touched (`touched_at`) for
the grace period. Uploads and mounts set `touched_at`; a HEAD sets it only
when it is older than half the grace period (one row write per blob per
half period, not per HEAD). So after an upload or mount a client has the
whole grace period, and after a HEAD that found the blob *at least half the
grace period*, to PUT a manifest naming it. This holds for a collector whose
grace is at least the API servers' `PEFTREG_GC_GRACE_SECONDS` (HEAD uses
that setting); `peftreg gc --grace` shorter than it weakens the promise.

Why a concurrent push is never broken
-------------------------------------

The invariant: *a blob row exists only while the store holds its bytes*, and
a manifest is accepted only if every blob it names has a row (linked in its
repository). GC keeps it by deleting in two steps, the row first:

A. In one transaction, candidate rows (unreferenced, `touched_at` older than
   the grace period) are locked `FOR UPDATE SKIP LOCKED` (PostgreSQL), then
   re-checked by a second statement, which in READ COMMITTED sees everything
   committed before the locks were granted, and deleted with their links.
   On SQLite every write transaction is `BEGIN IMMEDIATE`: the single writer
   lock gives the same exclusion.
B. After that commit, for each digest: in a new transaction holding the
   digest's lock (`peftreg.registry.catalog.blobs.lock_digest`: an advisory lock on
   PostgreSQL, the writer lock on SQLite), the bytes are deleted only if
   there is still no row.

The races, one by one:

- *HEAD (or mount) says "exists", the client skips the upload, GC deletes
  the blob before the manifest PUT.* A mount, and a HEAD of a blob touched
  more than half the grace period ago, update `touched_at` (`touch_blob`),
  which locks the row. If GC locked it first, the update waits, finds the
  row deleted and HEAD answers 404, so the client uploads. Otherwise the row
  is now younger than the grace period, and step A skips a locked row and
  re-checks `touched_at` of the ones it got. A HEAD that updates nothing
  found a row touched within half the grace period, which step A does not
  select until the other half has passed.
- *Manifest PUT naming a blob while GC deletes it.* The PUT reads the blob
  rows `FOR SHARE`: GC's `SKIP LOCKED` passes over them, and its re-check
  sees the manifest's references once it commits. If GC locked a row first,
  the PUT waits and then finds no row: `MANIFEST_BLOB_UNKNOWN`, which only
  happens to a blob nobody touched within the grace period.
- *Upload commit while GC scans.* The store commit of an upload is a no-op
  when the bytes are already there, and the row is written afterwards. Both
  happen in one transaction holding the digest's lock, which step B also
  takes: either B deleted the bytes first (then the upload writes them
  afresh), or the upload's row is committed when B looks (then B keeps the
  bytes). The upload *upserts* the row (`INSERT .. ON CONFLICT DO UPDATE`):
  if step A holds the row locked, PostgreSQL waits for A's commit and then
  inserts the row again, and B sees it. (An "insert unless present" would
  see the locked row, insert nothing, and link the repository to a row
  about to vanish: a foreign-key error and a failed push.)
- *GC crashing between A and B* leaves bytes without a row: step 2 above
  (orphans) removes them on the next run, under the same lock and check.
- *Two collectors at once.* Step B stats and deletes the bytes under the
  digest's lock, so exactly one run deletes them and counts them in
  `bytes_reclaimed`.

Bytes are thus deleted only after the row deletion committed, and only while
no row exists. Upload sessions go the same way: the row is deleted first (in
a short transaction, re-checking that it is still idle), then the store's
session, outside any transaction; a session being written at that moment
(`UploadBusy`) keeps its bytes until a later run finds them idle. Listings
and dry runs use read-only transactions, which never hold up a push.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, exists, select
from sqlalchemy.orm import Session

from peftreg.digest import Digest
from peftreg.registry.catalog import audit
from peftreg.registry.catalog.blobs import lock_digest
from peftreg.registry.db.models import Blob, ManifestReference, RepositoryBlob, UploadSession
from peftreg.registry.state import Services
from peftreg.registry.storage.errors import BlobNotFound, StorageError, UploadBusy

logger = logging.getLogger(__name__)

BATCH = 500
ACTOR = "gc"


@dataclass
class GcReport:
    dry_run: bool
    grace_seconds: float
    blobs_removed: int = 0
    """Blob rows deleted (dry: that would be)."""
    bytes_reclaimed: int = 0
    """Bytes this run deleted from the store (dry: would delete): blobs and orphans."""
    repository_links_removed: int = 0
    orphans_removed: int = 0
    """Store objects that had no blob row."""
    uploads_removed: int = 0
    blobs_spared: int = 0
    """Blobs deleted from the database whose bytes a concurrent upload claimed again."""
    duration_seconds: float = 0.0
    interrupted: bool = False
    """Stopped early (shutdown): what is counted was done, the rest waits for the next run."""
    error: str | None = None
    """Why the run failed, after doing what is counted."""
    removed: list[str] = field(default_factory=list)
    """Digests whose bytes this run deleted (dry: would delete): blobs and orphans."""

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
    stop: threading.Event | None = None,
) -> GcReport:
    """Remove what nothing references and nobody used within `grace`; see the module doc.

    `stop`, once set, ends the run between batches (the report says
    `interrupted`). A run that fails still audits what it did, then raises.
    """
    if grace < timedelta(0):
        raise ValueError("the grace period cannot be negative")
    started = time.perf_counter()
    now = datetime.now(UTC)
    report = GcReport(dry_run=dry_run, grace_seconds=grace.total_seconds())
    try:
        _collect_blobs(services, report, cutoff=now - grace, batch=batch, stop=stop)
        _collect_orphans(services, report, stop=stop)
        expiry = max(timedelta(seconds=services.settings.upload_expiry_seconds), grace)
        _collect_uploads(services, report, cutoff=now - expiry, stop=stop)
    except BaseException as exc:
        report.error = (str(exc).splitlines() or [""])[0] or type(exc).__name__
        raise
    finally:
        report.duration_seconds = round(time.perf_counter() - started, 3)
        _record(services, report, actor=actor)
    return report


def run_periodic_gc(services: Services, stop: threading.Event) -> None:
    """Collect garbage every `gc_interval_seconds` until `stop` is set (a server thread)."""
    interval = services.settings.gc_interval_seconds
    if interval <= 0:
        return
    grace = timedelta(seconds=services.settings.gc_grace_seconds)
    while not stop.wait(interval):
        try:
            report = collect_garbage(services, dry_run=False, grace=grace, stop=stop)
        except Exception:
            logger.exception("periodic garbage collection failed")
            services.metrics.observe_gc(outcome="failed")
        else:
            outcome = "interrupted" if report.interrupted else "ok"
            services.metrics.observe_gc(outcome=outcome, bytes_reclaimed=report.bytes_reclaimed)


def _stopping(report: GcReport, stop: threading.Event | None) -> bool:
    if stop is not None and stop.is_set():
        report.interrupted = True
    return report.interrupted


def _record(services: Services, report: GcReport, *, actor: str) -> None:
    """Log the run and, unless dry, audit it; an audit failure never hides the run's error.

    Logged at INFO even when failing: the error itself reaches the caller.
    """
    failed = report.error is not None
    logger.info(
        "garbage collection %s: %d blobs, %d bytes, %d uploads%s",
        "(dry run) would remove" if report.dry_run else "removed",
        report.blobs_removed + report.orphans_removed,
        report.bytes_reclaimed,
        report.uploads_removed,
        f" before failing: {report.error}" if failed else "",
        extra={"gc": report.summary()},
    )
    if report.dry_run:
        return
    try:
        with services.transaction() as session:
            audit.record(session, actor=actor, action="gc.run", detail=report.summary())
    except Exception:
        if not failed:
            raise
        logger.exception("cannot audit the failed garbage collection run")


# blobs ------------------------------------------------------------------------


def _unreferenced(cutoff: datetime) -> Any:
    return (Blob.touched_at < cutoff) & ~exists().where(ManifestReference.digest == Blob.digest)


def _collect_blobs(
    services: Services,
    report: GcReport,
    *,
    cutoff: datetime,
    batch: int,
    stop: threading.Event | None,
) -> None:
    after: str | None = ""
    while after is not None and not _stopping(report, stop):
        transaction = services.read_transaction if report.dry_run else services.transaction
        with transaction() as session:
            chosen, after = _delete_rows(
                session, cutoff=cutoff, after=after, batch=batch, report=report
            )
        for digest, size in chosen:
            if report.dry_run:
                report.blobs_removed += 1
                report.bytes_reclaimed += size
                report.removed.append(digest)
                continue
            deletion = _delete_bytes(services, digest)
            if deletion.spared:
                report.blobs_spared += 1
                continue
            report.blobs_removed += 1
            if deletion.size is not None:
                report.bytes_reclaimed += deletion.size
                report.removed.append(digest)


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


@dataclass(frozen=True)
class _Deletion:
    spared: bool = False
    """A row claims the bytes again (a concurrent upload): they stay."""
    size: int | None = None
    """Bytes this call deleted; None when it deleted nothing."""


def _delete_bytes(services: Services, digest: str) -> _Deletion:
    """Step B: delete the bytes unless a row exists again.

    Under the digest's lock the object is measured, then deleted: a
    concurrent collector that deleted it first leaves nothing to count.
    """
    parsed = Digest.parse(digest)
    with services.transaction() as session:
        lock_digest(session, parsed)
        if session.get(Blob, digest) is not None:
            return _Deletion(spared=True)
        try:
            size = services.store.stat(parsed)
            services.store.delete(parsed)
        except BlobNotFound:
            return _Deletion()  # deleted by a collector running concurrently
    return _Deletion(size=size)


# orphaned objects ---------------------------------------------------------------


def _collect_orphans(services: Services, report: GcReport, *, stop: threading.Event | None) -> None:
    if _stopping(report, stop):
        return
    with services.read_transaction() as session:
        known = set(session.scalars(select(Blob.digest)))
    for digest in list(services.store.list_digests()):
        if _stopping(report, stop):
            return
        if str(digest) in known:
            continue
        if report.dry_run:
            try:
                size = services.store.stat(digest)
            except BlobNotFound:
                continue
        else:
            # A row written since `known` was read spares the bytes (checked under the lock).
            deletion = _delete_bytes(services, str(digest))
            if deletion.size is None:
                continue
            size = deletion.size
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


def _collect_uploads(
    services: Services, report: GcReport, *, cutoff: datetime, stop: threading.Event | None
) -> None:
    if _stopping(report, stop):
        return
    with services.read_transaction() as session:
        expired = list(
            session.scalars(select(UploadSession.id).where(UploadSession.updated_at < cutoff))
        )
    for upload_id in expired:
        if _stopping(report, stop):
            return
        if report.dry_run or _delete_session_row(services, upload_id, cutoff):
            if not report.dry_run:
                _abort_store_session(services, upload_id)
            report.uploads_removed += 1
    # Store sessions without a row: read the rows after deleting the expired
    # ones, so a session created since then is recent and spared by `cutoff`.
    with services.read_transaction() as session:
        known = set(session.scalars(select(UploadSession.id)))
    for upload_id, written in _store_uploads(services):
        if _stopping(report, stop):
            return
        if upload_id in known or written >= cutoff:
            continue
        if report.dry_run or _abort_store_session(services, upload_id):
            report.uploads_removed += 1
    if _stopping(report, stop):
        return
    # Writes of whole blobs (`BlobStore.open_blob`) have no session row: one begun
    # before `cutoff` and still unfinished was abandoned by a process that died.
    report.uploads_removed += services.store.abort_blob_writes(cutoff, dry_run=report.dry_run)


def _delete_session_row(services: Services, upload_id: str, cutoff: datetime) -> bool:
    """Delete an upload session's row if it is still idle since before `cutoff`.

    A short transaction, with no store call in it: a row a request holds (or
    refreshed meanwhile) stays.
    """
    with services.transaction() as session:
        row = session.scalars(
            select(UploadSession)
            .where(UploadSession.id == upload_id, UploadSession.updated_at < cutoff)
            .with_for_update(skip_locked=True)
        ).first()
        if row is None:
            return False
        session.delete(row)
    return True


def _abort_store_session(services: Services, upload_id: str) -> bool:
    """Discard a session's bytes; False when a request is writing them right now."""
    try:
        services.store.abort_upload(upload_id)
    except UploadBusy:
        # Being written: its row is gone, so the client's next request is
        # refused; the bytes go once a later run finds them idle.
        return False
    return True
