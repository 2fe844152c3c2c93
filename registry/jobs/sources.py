"""What a job consumes: manifests and configs from the catalog, files from the store."""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError
from sqlalchemy.orm import Session

from peftreg.adapters.schema import (
    ADAPTER_CONFIG_MEDIA_TYPE,
    BASE_CONFIG_MEDIA_TYPE,
    AdapterConfig,
    BaseConfig,
)
from peftreg.digest import Digest
from peftreg.formats.calibration import InvalidCalibration, calibration_file, parse_calibration
from peftreg.manifest import (
    ADAPTER_ARTIFACT,
    BASE_ARTIFACT,
    TITLE_ANNOTATION,
    ImageManifest,
    InvalidManifest,
    parse_manifest,
)
from peftreg.reference import InvalidReference, Reference
from peftreg.registry.catalog import manifests
from peftreg.registry.errors import JobInvalid
from peftreg.registry.storage.base import BlobReader

MAX_CONFIG_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class Artifact:
    repository: str
    digest: str
    manifest: ImageManifest
    descriptor: dict[str, object]  # OCI descriptor of the manifest (for `subject`)


@dataclass(frozen=True)
class BaseArtifact(Artifact):
    config: BaseConfig


@dataclass(frozen=True)
class AdapterArtifact(Artifact):
    config: AdapterConfig


def parse_reference(text: str) -> Reference:
    try:
        return Reference.parse(text)
    except InvalidReference as exc:
        raise JobInvalid(str(exc), detail={"reference": text}) from None


def _load(
    session: Session, repository: str, identifier: str
) -> tuple[str, ImageManifest, dict[str, object]]:
    row = manifests.get_manifest(session, repository=repository, reference=identifier)
    try:
        parsed = parse_manifest(row.content, row.media_type)
    except InvalidManifest as exc:
        raise JobInvalid(f"{repository}@{row.digest} is not an image manifest: {exc}") from None
    if not isinstance(parsed, ImageManifest):
        raise JobInvalid(f"{repository}@{row.digest} is an index, not an artifact manifest")
    descriptor: dict[str, object] = {
        "mediaType": row.media_type,
        "digest": row.digest,
        "size": row.size,
    }
    if parsed.artifact_type:
        descriptor["artifactType"] = parsed.artifact_type
    return row.digest, parsed, descriptor


def read_config(store: BlobReader, manifest: ImageManifest) -> bytes:
    if manifest.config.size > MAX_CONFIG_BYTES:
        raise JobInvalid(f"config blob of {manifest.config.size} bytes is too large")
    return b"".join(store.read(Digest.parse(manifest.config.digest)))


def load_base(
    session: Session, store: BlobReader, repository: str, identifier: str
) -> BaseArtifact:
    digest, parsed, descriptor = _load(session, repository, identifier)
    where = f"{repository}@{digest}"
    if parsed.artifact_type != BASE_ARTIFACT or parsed.config.media_type != BASE_CONFIG_MEDIA_TYPE:
        raise JobInvalid(
            f"{where} is not a registered base model (artifactType {parsed.artifact_type!r}); "
            "push the model directory with `peftreg base push`",
            detail={"reference": where},
        )
    try:
        config = BaseConfig.model_validate_json(read_config(store, parsed))
    except ValidationError as exc:
        raise JobInvalid(f"{where}: invalid base config: {exc.errors()[0]['msg']}") from None
    return BaseArtifact(repository, digest, parsed, descriptor, config)


def load_adapter(
    session: Session, store: BlobReader, repository: str, identifier: str
) -> AdapterArtifact:
    digest, parsed, descriptor = _load(session, repository, identifier)
    where = f"{repository}@{digest}"
    if (
        parsed.artifact_type != ADAPTER_ARTIFACT
        or parsed.config.media_type != ADAPTER_CONFIG_MEDIA_TYPE
    ):
        raise JobInvalid(
            f"{where} is not a typed adapter (artifactType {parsed.artifact_type!r})",
            detail={"reference": where},
        )
    try:
        config = AdapterConfig.model_validate_json(read_config(store, parsed))
    except ValidationError as exc:
        raise JobInvalid(f"{where}: invalid adapter config: {exc.errors()[0]['msg']}") from None
    return AdapterArtifact(repository, digest, parsed, descriptor, config)


def _title(layer_annotations: dict[str, str] | None, digest: str) -> str:
    title = (layer_annotations or {}).get(TITLE_ANNOTATION)
    if not title or "/" in title or title in (".", ".."):
        raise JobInvalid(f"layer {digest} has no usable title")
    return title


def materialize(store: BlobReader, manifest: ImageManifest, target: Path) -> Path:
    """Write every layer under its title into `target` (made atomically; reused if present)."""
    if target.is_dir():
        return target
    staging = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.partial")
    staging.mkdir(parents=True)
    try:
        for layer in manifest.layers:
            path = staging / _title(layer.annotations, layer.digest)
            expected = Digest.parse(layer.digest)
            hasher = expected.hasher()
            with path.open("wb") as out:
                for chunk in store.read(expected):
                    hasher.update(chunk)
                    out.write(chunk)
            if hasher.hexdigest() != expected.hex:
                raise JobInvalid(
                    f"the stored bytes of {path.name} ({expected}) hash to "
                    f"{expected.algorithm}:{hasher.hexdigest()}; the store is corrupt "
                    "(`peftreg fsck` lists what else is)"
                )
        try:
            os.rename(staging, target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


@dataclass(frozen=True)
class CalibrationArtifact:
    """A calibration text artifact: one file (text or JSONL), checked to parse."""

    repository: str
    digest: str  # the manifest's
    title: str  # the file's name
    file_digest: str
    documents: int

    def recipe(self) -> dict[str, object]:
        return {
            "repository": self.repository,
            "digest": self.digest,
            "file": self.title,
            "file_digest": self.file_digest,
        }


def load_calibration(
    session: Session, store: BlobReader, repository: str, identifier: str
) -> CalibrationArtifact:
    """The calibration artifact at `repository`/`identifier`, refused (JobInvalid) when its
    file is not usable calibration text."""
    digest, parsed, _descriptor = _load(session, repository, identifier)
    where = f"{repository}@{digest}"
    try:
        found = calibration_file(parsed, where)
        data = b"".join(store.read(Digest.parse(found.digest)))
        documents = parse_calibration(data, found.title)
    except InvalidCalibration as exc:
        raise JobInvalid(f"{where}: {exc.message}", detail={"reference": where}) from None
    return CalibrationArtifact(repository, digest, found.title, found.digest, len(documents))
