"""The adapter card: what a version page shows, gathered from the catalog and the store."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session

from peftreg.manifest import CHECKPOINT_ARTIFACT, TITLE_ANNOTATION
from peftreg.registry.auth.scopes import Principal
from peftreg.registry.catalog import lineage, manifests, tags
from peftreg.registry.catalog.documents import read_json_blob, read_small_blob
from peftreg.registry.catalog.repositories import find_repository, is_immutable_tag
from peftreg.registry.db.models import ArtifactIndex, Manifest
from peftreg.registry.storage.base import BlobReader

README_NAMES = ("readme.md", "readme", "readme.txt", "model_card.md")
MAX_README_BYTES = 256 * 1024


@dataclass(frozen=True)
class FileRow:
    title: str
    digest: str
    size: int
    media_type: str


@dataclass(frozen=True)
class TargetRow:
    module: str
    layer: str
    rank: Any
    alpha: Any
    shapes: str


@dataclass
class VersionCard:
    repository: str
    manifest: Manifest
    document: dict[str, Any]
    index: ArtifactIndex | None
    config: Any
    tag_names: list[str]
    immutable: dict[str, bool]
    files: list[FileRow]
    targets: list[TargetRow] = field(default_factory=list)
    base_link: tuple[str, str] | None = None
    readme: str | None = None
    readme_markdown: bool = False
    exports: list[lineage.LineageNode] = field(default_factory=list)
    subject: str | None = None

    @property
    def kind(self) -> str:
        if self.index is not None:
            return self.index.kind
        if self.manifest.artifact_type == CHECKPOINT_ARTIFACT:
            return "checkpoint"
        return "artifact"

    @property
    def reference(self) -> str:
        tag = next((t for t in self.tag_names if self.immutable.get(t)), None)
        tag = tag or (self.tag_names[0] if self.tag_names else None)
        return f"{self.repository}:{tag}" if tag else f"{self.repository}@{self.manifest.digest}"

    @property
    def total_size(self) -> int:
        return sum(row.size for row in self.files)


def _files(document: dict[str, Any]) -> list[FileRow]:
    rows = []
    for layer in document.get("layers") or []:
        annotations = layer.get("annotations") or {}
        rows.append(
            FileRow(
                title=str(annotations.get(TITLE_ANNOTATION, "")) or str(layer.get("digest")),
                digest=str(layer.get("digest", "")),
                size=int(layer.get("size", 0)),
                media_type=str(layer.get("mediaType", "")),
            )
        )
    return rows


def _targets(config: dict[str, Any]) -> list[TargetRow]:
    tensors = config.get("tensors") or []
    rows = []
    generic = [{**m, "layer": "-"} for m in config.get("modules") or []]
    for target in [*(config.get("targets") or []), *generic]:
        module = str(target.get("module", ""))
        shapes = [
            f"{spec['name'].split(module + '.', 1)[-1]} {tuple(spec.get('shape', ()))}"
            for spec in tensors
            if f"{module}." in str(spec.get("name", ""))
        ]
        rows.append(
            TargetRow(
                module=module,
                layer=str(target.get("layer", "linear")),
                rank=target.get("rank"),
                alpha=target.get("alpha"),
                shapes="; ".join(shapes) or "-",
            )
        )
    return rows


def _readme(store: BlobReader, files: list[FileRow]) -> tuple[str | None, bool]:
    for row in files:
        if row.title.rsplit("/", 1)[-1].lower() in README_NAMES:
            data = read_small_blob(store, row.digest, MAX_README_BYTES)
            if data is not None:
                return data.decode("utf-8", "replace"), row.title.lower().endswith(".md")
    return None, False


def version_card(
    session: Session, store: BlobReader, *, principal: Principal, repository: str, reference: str
) -> VersionCard:
    """Everything the version page shows (authorize read on `repository` first)."""
    repo = find_repository(session, name=repository)
    row = manifests.get_manifest(session, repository=repository, reference=reference)
    document = json.loads(row.content)
    names = tags.tags_of(session, repository_id=row.repository_id, digest=row.digest)
    files = _files(document)
    config = read_json_blob(store, row.config_digest)
    card = VersionCard(
        repository=repository,
        manifest=row,
        document=document,
        index=session.get(ArtifactIndex, row.id),
        config=config if isinstance(config, dict) else None,
        tag_names=names,
        immutable={name: is_immutable_tag(repo, name) for name in names},
        files=files,
        subject=row.subject_digest,
    )
    if card.config is not None and card.kind not in ("base", "checkpoint", "artifact"):
        card.targets = _targets(card.config)
        fingerprint = card.index.base_fingerprint if card.index else None
        if fingerprint:
            found = lineage.bases_with_fingerprint(
                session, principal=principal, fingerprint=fingerprint
            )
            if found:
                card.base_link = (found[0][1], found[0][0].digest)
    card.readme, card.readme_markdown = _readme(store, files)
    card.exports = [
        lineage.LineageNode(
            repository,
            export.digest,
            tags.tags_of(session, repository_id=export.repository_id, digest=export.digest),
            "checkpoint",
        )
        for export in lineage.exports_of(session, manifest=row)
    ]
    return card
