"""`check_store`: verify that the database and the blob store agree.

- Every blob row: its object exists, has the recorded size and (unless
  `verify_digests=False`) hashes to its digest; the bytes are streamed, so
  memory stays at one read chunk whatever the blob size.
- Every manifest: its content hashes to its digest, and every blob it names
  has a row, is linked in the manifest's repository and has an object; every
  child manifest of an index exists in the repository.
- Every store object has a row; one without is reported as an orphan, which
  is not an error (`peftreg gc` removes it).

Read-only. Run while clients push, an upload between its store commit and
its row's commit can show as an orphan for a moment.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from sqlalchemy import select
from sqlalchemy.orm import Session

from client.digest import Digest, InvalidDigest
from registry.db.models import Blob, Manifest, ManifestReference, Repository, RepositoryBlob
from registry.state import Services
from registry.storage.errors import BlobNotFound

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
    sizes: dict[str, int] = {}
    missing: set[str] = set()
    with services.transaction() as session:
        for digest, size in _blob_rows(session):
            sizes[digest] = size
    for digest, size in sizes.items():
        problem = _check_blob(services, digest, size, verify_digests=verify_digests)
        report.blobs_checked += 1
        if problem is None:
            report.bytes_checked += size if verify_digests else 0
            continue
        report.problems.append(problem)
        if problem.kind == "missing_object":
            missing.add(digest)
    with services.transaction() as session:
        _check_manifests(session, report, sizes, missing)
    for stored in services.store.list_digests():
        report.objects_listed += 1
        if str(stored) not in sizes:
            report.problems.append(
                Problem("orphan_object", str(stored), "in the store but not in the database")
            )
    logger.info(
        "fsck: %d blobs, %d manifests, %d errors, %d orphans",
        report.blobs_checked,
        report.manifests_checked,
        len(report.errors),
        len(report.orphans),
    )
    return report


def _blob_rows(session: Session) -> Iterator[tuple[str, int]]:
    after = ""
    while True:
        page = session.execute(
            select(Blob.digest, Blob.size)
            .where(Blob.digest > after)
            .order_by(Blob.digest)
            .limit(PAGE)
        ).all()
        if not page:
            return
        for digest, size in page:
            yield digest, int(size)
        after = page[-1][0]


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


def _check_manifests(
    session: Session, report: FsckReport, sizes: dict[str, int], missing: set[str]
) -> None:
    names = dict(session.execute(select(Repository.id, Repository.name)).all())
    linked: set[tuple[int, str]] = set(
        session.execute(select(RepositoryBlob.repository_id, RepositoryBlob.digest)).all()
    )
    present: set[tuple[int, str]] = set(
        session.execute(select(Manifest.repository_id, Manifest.digest)).all()
    )
    references: dict[int, list[tuple[str, str]]] = {}
    for manifest_id, digest, kind in session.execute(
        select(ManifestReference.manifest_id, ManifestReference.digest, ManifestReference.kind)
    ).all():
        references.setdefault(manifest_id, []).append((digest, kind))
    query = select(Manifest).order_by(Manifest.id).execution_options(yield_per=PAGE)
    for manifest in session.scalars(query):
        report.manifests_checked += 1
        repository = names.get(manifest.repository_id, f"#{manifest.repository_id}")
        report.problems.extend(_manifest_problems(manifest, repository))
        for digest, kind in references.get(manifest.id, []):
            detail = _reference_problem(
                manifest.repository_id, digest, kind, sizes, missing, linked, present
            )
            if detail is not None:
                problem_kind, text = detail
                report.problems.append(
                    Problem(problem_kind, digest, text, manifest.digest, repository)
                )


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


def _reference_problem(
    repository_id: int,
    digest: str,
    kind: str,
    sizes: dict[str, int],
    missing: set[str],
    linked: set[tuple[int, str]],
    present: set[tuple[int, str]],
) -> tuple[ProblemKind, str] | None:
    if kind == "manifest":
        if (repository_id, digest) not in present:
            return "manifest_child_missing", "the index names a manifest the repository lacks"
        return None
    if digest not in sizes:
        return "manifest_blob_missing", f"its {kind} blob has no database row"
    if digest in missing:
        return "manifest_blob_missing", f"its {kind} blob's bytes are missing from the store"
    if (repository_id, digest) not in linked:
        return "manifest_blob_unlinked", f"its {kind} blob is not linked in the repository"
    return None
