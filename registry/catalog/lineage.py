"""Lineage: a base, the adapters trained on it, and the checkpoints exported from each.

Adapters name their base by content fingerprint; exports name their source
adapter as OCI `subject` and carry the recipe in their config blob. Only what
the principal may read is returned.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from peftreg.digest import Digest
from peftreg.manifest import CHECKPOINT_ARTIFACT
from peftreg.registry.auth.scopes import Principal
from peftreg.registry.catalog import manifests, search, tags
from peftreg.registry.db.models import ArtifactIndex, Manifest, Repository, Tag
from peftreg.registry.storage.base import BlobReader
from peftreg.registry.storage.errors import BlobNotFound

MAX_ADAPTERS = 12
MAX_RECIPE_BYTES = 256 * 1024


@dataclass(frozen=True)
class LineageNode:
    repository: str
    digest: str
    tags: list[str]
    kind: str
    recipe: dict[str, Any] | None = None


@dataclass(frozen=True)
class AdapterLineage:
    adapter: LineageNode
    exports: list[LineageNode] = field(default_factory=list)


@dataclass(frozen=True)
class Lineage:
    base: LineageNode | None
    base_fingerprint: str | None
    adapters: list[AdapterLineage]
    more_adapters: bool


def bases_with_fingerprint(
    session: Session, *, principal: Principal, fingerprint: str
) -> list[tuple[Manifest, str]]:
    """Registered bases with this content fingerprint that the principal may read."""
    rows = session.execute(
        select(Manifest, Repository.name)
        .join(ArtifactIndex, ArtifactIndex.manifest_id == Manifest.id)
        .join(Repository, Repository.id == Manifest.repository_id)
        .where(ArtifactIndex.kind == "base", ArtifactIndex.fingerprint == fingerprint)
        .order_by(Manifest.id)
        .limit(50)
    ).tuples()
    return [(row, name) for row, name in rows if principal.can("read", name)]


def exports_of(session: Session, *, manifest: Manifest) -> list[Manifest]:
    """Checkpoints whose subject is this manifest (its repository's referrers)."""
    return list(
        session.scalars(
            select(Manifest)
            .where(
                Manifest.repository_id == manifest.repository_id,
                Manifest.subject_digest == manifest.digest,
                Manifest.artifact_type == CHECKPOINT_ARTIFACT,
            )
            .order_by(Manifest.id)
        )
    )


def _recipe(store: BlobReader, manifest: Manifest) -> dict[str, Any] | None:
    if manifest.config_digest is None:
        return None
    try:
        digest = Digest.parse(manifest.config_digest)
        if store.stat(digest) > MAX_RECIPE_BYTES:
            return None
        document = json.loads(b"".join(store.read(digest)))
    except (BlobNotFound, ValueError):
        return None
    return document if isinstance(document, dict) else None


def _node(session: Session, manifest: Manifest, repository: str, kind: str) -> LineageNode:
    names = tags.tags_of(session, repository_id=manifest.repository_id, digest=manifest.digest)
    return LineageNode(repository, manifest.digest, names, kind)


def _with_exports(
    session: Session, store: BlobReader, adapters: list[tuple[search.ListedVersion, LineageNode]]
) -> list[AdapterLineage]:
    """Each adapter with its exports: one query for the exports, one for their tags."""
    if not adapters:
        return []
    rows = list(
        session.scalars(
            select(Manifest)
            .where(
                Manifest.subject_digest.in_({m.digest for m, _node in adapters}),
                Manifest.artifact_type == CHECKPOINT_ARTIFACT,
            )
            .order_by(Manifest.id)
        )
    )
    tag_names: dict[tuple[int, str], list[str]] = {}
    if rows:
        for repository_id, digest, name in session.execute(
            select(Tag.repository_id, Tag.manifest_digest, Tag.name)
            .where(Tag.manifest_digest.in_({row.digest for row in rows}))
            .order_by(Tag.name)
        ).tuples():
            tag_names.setdefault((repository_id, digest), []).append(name)
    found = []
    for manifest, node in adapters:
        exports = [
            LineageNode(
                node.repository,
                row.digest,
                tag_names.get((row.repository_id, row.digest), []),
                "checkpoint",
                _recipe(store, row),
            )
            for row in rows
            if row.subject_digest == manifest.digest and row.repository_id == manifest.repository_id
        ]
        found.append(AdapterLineage(node, exports))
    return found


def lineage_of(
    session: Session, store: BlobReader, *, principal: Principal, repository: str, reference: str
) -> Lineage:
    """The lineage around a base, an adapter or an export (authorize `repository` first)."""
    manifest = manifests.get_manifest(session, repository=repository, reference=reference)
    if manifest.artifact_type == CHECKPOINT_ARTIFACT and manifest.subject_digest:
        manifest = manifests.get_manifest(
            session, repository=repository, reference=manifest.subject_digest
        )
    index = session.get(ArtifactIndex, manifest.id)
    if index is not None and index.kind == "base":
        fingerprint: str | None = index.fingerprint
        base: LineageNode | None = _node(session, manifest, repository, "base")
    else:
        fingerprint = index.base_fingerprint if index is not None else None
        found = (
            bases_with_fingerprint(session, principal=principal, fingerprint=fingerprint)
            if fingerprint
            else []
        )
        base = _node(session, found[0][0], found[0][1], "base") if found else None
    anchor = (
        search.ListedVersion.of(manifest),
        _node(session, manifest, repository, index.kind if index else "artifact"),
    )
    if fingerprint is None:
        return Lineage(base, None, _with_exports(session, store, [anchor]), False)
    page = search.list_versions(
        session,
        principal=principal,
        repository=None,
        artifact_type=None,
        annotations={},
        cursor=None,
        limit=MAX_ADAPTERS,
        filters=search.ArtifactFilters(base_fingerprint=fingerprint),
    )
    adapters = [
        (row, LineageNode(name, row.digest, names, summary.kind if summary else "adapter"))
        for row, name, names, summary in page.items
    ]
    if (
        index is not None
        and index.kind != "base"
        and all(row.id != manifest.id for row, _ in adapters)
    ):
        adapters.insert(0, anchor)
    exports = _with_exports(session, store, adapters)
    return Lineage(base, fingerprint, exports, page.next_cursor is not None)
