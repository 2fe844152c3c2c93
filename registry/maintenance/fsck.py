"""`check_store`: verify that the database and the blob store agree.

- Every blob row: its object exists, has the recorded size and (unless
  `verify_digests=False`) hashes to its digest; the bytes are streamed, so
  memory stays at one read chunk whatever the blob size.
- Every manifest: its content hashes to its digest, and every blob it names
  has a row, is linked in the manifest's repository and has an object; every
  child manifest of an index exists in the repository.
- Every store object has a row; one without is reported as an orphan, which
  is not an error (`peftreg gc` removes it).

Read-only, and safe to run while clients push and garbage collection runs:

- every database read is a read-only transaction (`Services.read_transaction`:
  on SQLite it takes no write lock, so pushes go on), and no transaction
  stays open while bytes are hashed;
- a manifest and the blob rows and links it names are read by one join in
  one snapshot, so a manifest pushed meanwhile is checked against the rows
  it was accepted with;
- an object found missing is reported only if, looked up again afterwards,
  its row still exists and its object is still absent: garbage collection
  deletes the row before the bytes, so a blob it collected meanwhile is no
  error;
- an object without a row is looked up again before being called an orphan
  (an upload commits its bytes a moment before its row).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from sqlalchemy import select
from sqlalchemy.orm import Session, aliased

from peftreg.digest import Digest, InvalidDigest
from peftreg.registry.db.models import Blob, Manifest, ManifestReference, Repository, RepositoryBlob
from peftreg.registry.state import Services
from peftreg.registry.storage.errors import BlobNotFound

logger = logging.getLogger(__name__)

ProblemKind = Literal[
    "digest_mismatch",
    "size_mismatch",
    "missing_object",
    "manifest_digest_mismatch",
    "manifest_blob_missing",
    "manifest_blob_unlinked",
    "manifest_child_missing",
    "orphan_object",
]
NOT_ERRORS: frozenset[str] = frozenset({"orphan_object"})
PAGE = 1000


@dataclass(frozen=True)
class Problem:
    kind: ProblemKind
    digest: str | None
    """The blob (or manifest, for `manifest_digest_mismatch`) at fault."""
    detail: str
    manifest: str | None = None
    repository: str | None = None

    @property
    def is_error(self) -> bool:
        return self.kind not in NOT_ERRORS

    def describe(self) -> str:
        """One line: kind, where, what."""
        where = []
        if self.repository is not None:
            where.append(self.repository + (f"@{self.manifest}" if self.manifest else ""))
        if self.digest is not None and self.digest != self.manifest:
            where.append(self.digest)
        return f"{self.kind}: {' '.join(where)}: {self.detail}"


@dataclass
class FsckReport:
    problems: list[Problem] = field(default_factory=list)
    blobs_checked: int = 0
    bytes_checked: int = 0
    manifests_checked: int = 0
    objects_listed: int = 0

    @property
    def errors(self) -> list[Problem]:
        return [problem for problem in self.problems if problem.is_error]

    @property
    def orphans(self) -> list[Problem]:
        return [problem for problem in self.problems if not problem.is_error]

    def as_dict(self) -> dict[str, Any]:
        document = asdict(self)
        document["errors"] = len(self.errors)
        return document


def check_store(services: Services, *, verify_digests: bool = True) -> FsckReport:
    """Check every blob, manifest and store object; see the module doc."""
    report = FsckReport()
    seen: set[str] = set()
    missing: set[str] = set()
    for page in _blob_pages(services):
        for digest, size in page:
            seen.add(digest)
            problem = _check_blob(services, digest, size, verify_digests=verify_digests)
            if problem is not None and problem.kind == "missing_object":
                if not _still_missing(services, digest):
                    continue  # collected since it was listed
                missing.add(digest)
            report.blobs_checked += 1
            if problem is None:
                report.bytes_checked += size if verify_digests else 0
            else:
                report.problems.append(problem)
    with services.read_transaction() as session:
        _check_manifests(session, report, missing)
    _check_objects(services, report, seen)
    logger.info(
        "fsck: %d blobs, %d manifests, %d errors, %d orphans",
        report.blobs_checked,
        report.manifests_checked,
        len(report.errors),
        len(report.orphans),
    )
    return report


def _blob_pages(services: Services) -> Iterator[list[tuple[str, int]]]:
    """Blob rows a page at a time, each read in its own short read-only transaction."""
    after = ""
    while True:
        with services.read_transaction() as session:
            page = [
                (digest, int(size))
                for digest, size in session.execute(
                    select(Blob.digest, Blob.size)
                    .where(Blob.digest > after)
                    .order_by(Blob.digest)
                    .limit(PAGE)
                ).all()
            ]
        if not page:
            return
        yield page
        after = page[-1][0]


def _still_missing(services: Services, digest: str) -> bool:
    """Whether the blob's row exists and its object is absent, looked up now."""
    with services.read_transaction() as session:
        if session.get(Blob, digest) is None:
            return False
    try:
        services.store.stat(Digest.parse(digest))
    except BlobNotFound:
        return True
    return False


def _check_objects(services: Services, report: FsckReport, seen: set[str]) -> None:
    """Store objects without a row: orphans (not errors) unless a row appeared since."""
    unknown: list[str] = []
    for stored in services.store.list_digests():
        report.objects_listed += 1
        if str(stored) not in seen:
            unknown.append(str(stored))
    for start in range(0, len(unknown), PAGE):
        chunk = unknown[start : start + PAGE]
        with services.read_transaction() as session:
            recorded = set(session.scalars(select(Blob.digest).where(Blob.digest.in_(chunk))))
        for digest in chunk:
            if digest not in recorded:
                report.problems.append(
                    Problem("orphan_object", digest, "in the store but not in the database")
                )


def _check_blob(
    services: Services, digest: str, size: int, *, verify_digests: bool
) -> Problem | None:
    try:
        parsed = Digest.parse(digest)
    except InvalidDigest as exc:
        return Problem("digest_mismatch", digest, f"the recorded digest is malformed: {exc}")
    try:
        if not verify_digests:
            stored_size = services.store.stat(parsed)
            actual = None
        else:
            hasher = hashlib.new(parsed.algorithm)
            stored_size = 0
            for chunk in services.store.read(parsed):
                hasher.update(chunk)
                stored_size += len(chunk)
            actual = hasher.hexdigest()
    except BlobNotFound:
        return Problem("missing_object", digest, "the database records it; the store lacks it")
    if stored_size != size:
        return Problem(
            "size_mismatch",
            digest,
            f"the store holds {stored_size} bytes; the database records {size}",
        )
    if actual is not None and actual != parsed.hex:
        return Problem(
            "digest_mismatch", digest, f"the stored bytes hash to {parsed.algorithm}:{actual}"
        )
    return None


def _check_manifests(session: Session, report: FsckReport, missing: set[str]) -> None:
    """Every manifest, a page at a time, with its references joined to rows and links."""
    names = dict(session.execute(select(Repository.id, Repository.name)).all())
    after = 0
    while True:
        manifests = list(
            session.scalars(
                select(Manifest).where(Manifest.id > after).order_by(Manifest.id).limit(PAGE)
            )
        )
        if not manifests:
            return
        references = _references(session, [manifest.id for manifest in manifests])
        for manifest in manifests:
            report.manifests_checked += 1
            repository = names.get(manifest.repository_id, f"#{manifest.repository_id}")
            report.problems.extend(_manifest_problems(manifest, repository))
            for reference in references.get(manifest.id, []):
                detail = _reference_problem(reference, missing)
                if detail is not None:
                    kind, text = detail
                    report.problems.append(
                        Problem(kind, reference.digest, text, manifest.digest, repository)
                    )
        after = manifests[-1].id
        session.expunge_all()


@dataclass(frozen=True)
class _Reference:
    digest: str
    kind: str
    has_row: bool
    """A blob row exists."""
    linked: bool
    """The blob is linked in the manifest's repository."""
    child_present: bool
    """A manifest with this digest is in the manifest's repository."""


def _references(session: Session, manifest_ids: list[int]) -> dict[int, list[_Reference]]:
    """The references of these manifests, with what they name, in one statement."""
    owner = aliased(Manifest)
    child = aliased(Manifest)
    rows = session.execute(
        select(
            ManifestReference.manifest_id,
            ManifestReference.digest,
            ManifestReference.kind,
            Blob.digest.is_not(None),
            RepositoryBlob.digest.is_not(None),
            child.id.is_not(None),
        )
        .join(owner, owner.id == ManifestReference.manifest_id)
        .outerjoin(Blob, Blob.digest == ManifestReference.digest)
        .outerjoin(
            RepositoryBlob,
            (RepositoryBlob.repository_id == owner.repository_id)
            & (RepositoryBlob.digest == ManifestReference.digest),
        )
        .outerjoin(
            child,
            (child.repository_id == owner.repository_id)
            & (child.digest == ManifestReference.digest),
        )
        .where(ManifestReference.manifest_id.in_(manifest_ids))
        .order_by(ManifestReference.manifest_id, ManifestReference.digest)
    ).all()
    found: dict[int, list[_Reference]] = {}
    for manifest_id, digest, kind, has_row, linked, child_present in rows:
        found.setdefault(manifest_id, []).append(
            _Reference(digest, kind, bool(has_row), bool(linked), bool(child_present))
        )
    return found


def _manifest_problems(manifest: Manifest, repository: str) -> list[Problem]:
    try:
        claimed = Digest.parse(manifest.digest)
        actual = hashlib.new(claimed.algorithm, manifest.content).hexdigest()
    except (InvalidDigest, ValueError) as exc:
        return [
            Problem(
                "manifest_digest_mismatch",
                manifest.digest,
                f"cannot check: {exc}",
                manifest.digest,
                repository,
            )
        ]
    if actual == claimed.hex:
        return []
    return [
        Problem(
            "manifest_digest_mismatch",
            manifest.digest,
            f"the stored manifest hashes to {claimed.algorithm}:{actual}",
            manifest.digest,
            repository,
        )
    ]


def _reference_problem(reference: _Reference, missing: set[str]) -> tuple[ProblemKind, str] | None:
    kind = reference.kind
    if kind == "manifest":
        if not reference.child_present:
            return "manifest_child_missing", "the index names a manifest the repository lacks"
        return None
    if not reference.has_row:
        return "manifest_blob_missing", f"its {kind} blob has no database row"
    if reference.digest in missing:
        return "manifest_blob_missing", f"its {kind} blob's bytes are missing from the store"
    if not reference.linked:
        return "manifest_blob_unlinked", f"its {kind} blob is not linked in the repository"
    return None
