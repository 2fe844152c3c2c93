"""Manifests: validated against the blobs they name, stored with their exact bytes."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from peftreg.digest import Digest, InvalidDigest
from peftreg.manifest import (
    ADAPTER_ARTIFACT,
    BASE_ARTIFACT,
    CHECKPOINT_ARTIFACT,
    OCI_INDEX,
    PROMPT_ARTIFACT,
    Descriptor,
    ImageIndex,
    ImageManifest,
    InvalidManifest,
    parse_manifest,
)
from peftreg.registry.auth.scopes import Principal
from peftreg.registry.catalog import artifacts, audit, tags
from peftreg.registry.catalog.repositories import (
    ensure_repository,
    find_repository,
    is_immutable_tag,
    valid_name,
)
from peftreg.registry.db.models import (
    ArtifactIndex,
    Blob,
    Manifest,
    ManifestReference,
    Repository,
    RepositoryBlob,
    Tag,
)
from peftreg.registry.errors import (
    DigestInvalid,
    LayerTitleInvalid,
    ManifestBlobUnknown,
    ManifestInvalid,
    ManifestUnknown,
    TagImmutable,
    TagInvalid,
    VersionInUse,
)
from peftreg.registry.storage.base import BlobReader
from peftreg.sdk.errors import UnsafePath
from peftreg.transfer.titles import layer_paths

S = TypeVar("S", bound=Select[*tuple[Any, ...]])  # selecting `Manifest` first


@dataclass(frozen=True)
class PutResult:
    digest: str
    subject: str | None
    tags_moved: list[str]


def is_digest(reference: str) -> bool:
    return ":" in reference


def put_manifest(
    session: Session,
    *,
    principal: Principal,
    repository: str,
    reference: str,
    content: bytes,
    content_type: str | None,
    extra_tags: list[str] | None = None,
    store: BlobReader | None = None,
) -> PutResult:
    """Store a manifest and point its tags at it.

    Every blob the manifest names (config, layers; child manifests of an
    index) must already be in the repository, so a manifest never refers to
    bytes that are not there. With `store`, adapter and base artifacts are
    validated against their blobs (`peftreg.registry.catalog.artifacts`) and indexed;
    an invalid one raises before anything is recorded.
    """
    digest = str(Digest.of_bytes(content))
    tag_names = list(extra_tags or [])
    if is_digest(reference):
        claimed = Digest.parse(_valid_digest(reference))
        actual = Digest(claimed.algorithm, hashlib.new(claimed.algorithm, content).hexdigest())
        if actual != claimed:
            raise DigestInvalid(
                f"manifest content hashes to {actual}, not {reference}",
                detail={"expected": reference, "actual": str(actual)},
            )
        digest = str(claimed)
    else:
        tag_names.insert(0, tags.valid_tag(reference))
    for name in tag_names:
        tags.valid_tag(name)
    try:
        parsed = parse_manifest(content, content_type)
    except InvalidManifest as exc:
        raise ManifestInvalid(str(exc)) from None
    _check_layer_titles(parsed)

    repo = ensure_repository(session, name=repository)
    references = _check_references(session, repo, parsed)

    subject = parsed.subject.digest if parsed.subject is not None else None
    existing = session.scalar(
        select(Manifest).where(Manifest.repository_id == repo.id, Manifest.digest == digest)
    )
    if existing is None:
        index = artifacts.inspect_artifact(session, store, parsed) if store is not None else None
        row = Manifest(
            repository_id=repo.id,
            digest=digest,
            media_type=parsed.media_type or OCI_INDEX,
            artifact_type=_artifact_type(parsed),
            config_digest=parsed.config.digest if isinstance(parsed, ImageManifest) else None,
            subject_digest=subject,
            annotations=parsed.annotations or {},
            size=len(content),
            content=content,
            pushed_by=principal.name,
        )
        session.add(row)
        session.flush()
        if index is not None:
            index.manifest_id = row.id
            session.add(index)
        for ref_digest, kind in references.items():
            session.add(ManifestReference(manifest_id=row.id, digest=ref_digest, kind=kind))
        audit.record(
            session,
            actor=principal.name,
            action="manifest.put",
            repository=repository,
            target=digest,
            detail={"artifact_type": row.artifact_type, "size": len(content)},
        )
    moved = [
        name
        for name in tag_names
        if tags.set_tag(session, principal=principal, repository=repo, tag=name, digest=digest)
    ]
    return PutResult(digest=digest, subject=subject, tags_moved=moved)


def _check_layer_titles(parsed: ImageManifest | ImageIndex) -> None:
    """peftreg's own artifacts are pulled into directories: their layers' titles must be
    the safe, distinct relative paths the client would accept (`peftreg.transfer.titles`)."""
    if not isinstance(parsed, ImageManifest) or parsed.resolved_artifact_type() not in (
        ADAPTER_ARTIFACT,
        BASE_ARTIFACT,
        CHECKPOINT_ARTIFACT,
        PROMPT_ARTIFACT,
    ):
        return
    try:
        layer_paths(parsed.layers)
    except UnsafePath as exc:
        raise LayerTitleInvalid(exc.message, detail=exc.detail) from None


def get_manifest(session: Session, *, repository: str, reference: str) -> Manifest:
    """A version by digest or tag, in one statement (see `_find`)."""
    key = _valid_reference(session, repository, reference)
    row = session.scalar(_find(select(Manifest), repository, reference, key))
    if row is None:
        _missing(session, repository, reference, key)
    return row


def get_version(
    session: Session, *, repository: str, reference: str
) -> tuple[Manifest, list[str], ArtifactIndex | None]:
    """A version by digest or tag with its tags and index row, in one statement."""
    key = _valid_reference(session, repository, reference)
    statement = _find(
        select(Manifest, tags.names_column(), ArtifactIndex).outerjoin(
            ArtifactIndex, ArtifactIndex.manifest_id == Manifest.id
        ),
        repository,
        reference,
        key,
    )
    found = session.execute(statement).first()
    if found is None:
        _missing(session, repository, reference, key)
    row, names, index = found
    return row, tags.split_names(names), index


def _valid_reference(session: Session, repository: str, reference: str) -> str:
    """The digest or tag `reference` names, checked; an unknown repository is reported first."""
    valid_name(repository)
    try:
        return _valid_digest(reference) if is_digest(reference) else tags.valid_tag(reference)
    except (DigestInvalid, TagInvalid):
        find_repository(session, name=repository)
        raise


def _find(statement: S, repository: str, reference: str, key: str) -> S:
    """`statement` (selecting `Manifest`) narrowed to the version: repository, tag and
    version joined on their unique indexes."""
    statement = statement.join(Repository, Repository.id == Manifest.repository_id).where(
        Repository.name == repository
    )
    if is_digest(reference):
        return statement.where(Manifest.digest == key)
    return statement.join(
        Tag,
        (Tag.repository_id == Manifest.repository_id) & (Tag.manifest_digest == Manifest.digest),
    ).where(Tag.name == key)


def _missing(session: Session, repository: str, reference: str, key: str) -> NoReturn:
    """Raise what is missing: the repository, the tag, or the version."""
    repo = find_repository(session, name=repository)
    if not is_digest(reference):
        tags.resolve_tag(session, repository=repo, tag=key)
    raise ManifestUnknown(
        f"manifest {reference} is not in {repository}", detail={"reference": reference}
    )


def _valid_digest(reference: str) -> str:
    try:
        return str(Digest.parse(reference))
    except InvalidDigest as exc:
        raise DigestInvalid(str(exc), detail={"digest": reference}) from None


def delete_manifest(
    session: Session, *, principal: Principal, repository: str, digest: str, force: bool
) -> list[str]:
    """Delete a version; refused while tags point at it unless `force`.

    Returns the tags removed. Blobs stay until garbage collection finds them
    unreferenced.
    """
    repo = find_repository(session, name=repository)
    row = get_manifest(session, repository=repository, reference=digest)
    pointing = tags.tags_of(session, repository_id=repo.id, digest=row.digest)
    if pointing and not force:
        raise VersionInUse(
            f"{repository}@{digest} is tagged {', '.join(pointing)}; untag it or force the delete",
            detail={"tags": pointing},
        )
    immutable = [tag for tag in pointing if is_immutable_tag(repo, tag)]
    if immutable:
        # A release tag must never come to name other content: forcing does not
        # override the policy; changing the policy first is an explicit, audited act.
        raise TagImmutable(
            f"{repository}@{digest} carries immutable tag(s) {', '.join(immutable)}; "
            "change the repository's tag policy before deleting it",
            detail={"tags": immutable},
        )
    removed = tags.untag_digest(session, principal=principal, repository=repo, digest=row.digest)
    session.delete(row)
    audit.record(
        session,
        actor=principal.name,
        action="manifest.delete",
        repository=repository,
        target=digest,
        detail={"tags_removed": removed, "forced": force},
    )
    return removed


def referrers(
    session: Session, *, repository: str, digest: str, artifact_type: str | None
) -> dict[str, Any]:
    """The OCI referrers index: manifests in the repository whose subject is `digest`."""
    repo = find_repository(session, name=repository)
    query = select(Manifest).where(
        Manifest.repository_id == repo.id, Manifest.subject_digest == digest
    )
    if artifact_type:
        query = query.where(Manifest.artifact_type == artifact_type)
    descriptors = []
    for row in session.scalars(query.order_by(Manifest.id)):
        descriptor: dict[str, Any] = {
            "mediaType": row.media_type,
            "digest": row.digest,
            "size": row.size,
        }
        if row.artifact_type:
            descriptor["artifactType"] = row.artifact_type
        if row.annotations:
            descriptor["annotations"] = row.annotations
        descriptors.append(descriptor)
    return {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descriptors}


def _artifact_type(parsed: ImageManifest | ImageIndex) -> str | None:
    if isinstance(parsed, ImageManifest):
        return parsed.resolved_artifact_type()
    return parsed.artifact_type


def _descriptors(parsed: ImageManifest | ImageIndex) -> list[Descriptor]:
    if isinstance(parsed, ImageManifest):
        return [parsed.config, *parsed.layers]
    return list(parsed.manifests)


def _references(parsed: ImageManifest | ImageIndex) -> dict[str, str]:
    if isinstance(parsed, ImageManifest):
        found = {parsed.config.digest: "config"}
        for layer in parsed.layers:
            found.setdefault(layer.digest, "layer")
        return found
    return {child.digest: "manifest" for child in parsed.manifests}


def _check_references(
    session: Session, repo: Repository, parsed: ImageManifest | ImageIndex
) -> dict[str, str]:
    """Every descriptor names content in the repository, with its true size.

    A wrong declared size would make clients and the registry itself read a
    different amount than is stored (and size caps be decided on a lie).
    """
    references = _references(parsed)
    blobs = [d for d, kind in references.items() if kind != "manifest"]
    children = [d for d, kind in references.items() if kind == "manifest"]
    sizes: dict[str, int] = {}
    if blobs:
        rows = session.execute(
            select(Blob.digest, Blob.size)
            .join(RepositoryBlob, RepositoryBlob.digest == Blob.digest)
            .where(RepositoryBlob.repository_id == repo.id, Blob.digest.in_(blobs))
            .order_by(Blob.digest)
            # Garbage collection skips (and re-checks) locked blob rows: it cannot
            # delete one of these until the manifest naming it has committed.
            .with_for_update(read=True, of=Blob)
        ).tuples()
        sizes.update({digest: size for digest, size in rows})
    if children:
        rows = session.execute(
            select(Manifest.digest, Manifest.size).where(
                Manifest.repository_id == repo.id, Manifest.digest.in_(children)
            )
        ).tuples()
        sizes.update({digest: size for digest, size in rows})
    missing = [d for d in references if d not in sizes]
    if missing:
        raise ManifestBlobUnknown(
            f"manifest references {len(missing)} blob(s) not in {repo.name}: {', '.join(missing)}",
            detail={"missing": missing},
        )
    for descriptor in _descriptors(parsed):
        if descriptor.size != sizes[descriptor.digest]:
            raise ManifestInvalid(
                f"descriptor {descriptor.digest} declares {descriptor.size} bytes; "
                f"the stored content is {sizes[descriptor.digest]}",
                detail={"digest": descriptor.digest, "declared": descriptor.size},
            )
    return references
