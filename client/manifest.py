"""OCI image manifests, indexes and descriptors as typed models.

A manifest's digest is over its exact bytes, so these models are used to
read and validate; `canonical_json` produces the bytes we push ourselves.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from peftreg.digest import Digest
from peftreg.formats.bounded_json import JsonTooDeep, loads_bounded

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_MEDIA_TYPES = (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST)
INDEX_MEDIA_TYPES = (OCI_INDEX, DOCKER_MANIFEST_LIST)
EMPTY_JSON = "application/vnd.oci.empty.v1+json"
EMPTY_JSON_DIGEST = "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
TITLE_ANNOTATION = "org.opencontainers.image.title"

ADAPTER_ARTIFACT = "application/vnd.peftreg.adapter.v1"
ADAPTER_CONFIG_MEDIA_TYPE = "application/vnd.peftreg.adapter.config.v1+json"
BASE_ARTIFACT = "application/vnd.peftreg.base.v1"
CHECKPOINT_ARTIFACT = "application/vnd.peftreg.checkpoint.v1"
PROMPT_ARTIFACT = "application/vnd.peftreg.prompt.v1"


class InvalidManifest(ValueError):
    """Bytes that are not a valid OCI manifest or index."""


class Descriptor(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    media_type: str = Field(alias="mediaType")
    digest: str
    size: int = Field(ge=0)
    annotations: dict[str, str] | None = None
    artifact_type: str | None = Field(default=None, alias="artifactType")
    urls: list[str] | None = None
    data: str | None = None

    @field_validator("digest")
    @classmethod
    def _valid_digest(cls, value: str) -> str:
        Digest.parse(value)
        return value


class ImageManifest(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    schema_version: Literal[2] = Field(alias="schemaVersion")
    media_type: str | None = Field(default=None, alias="mediaType")
    artifact_type: str | None = Field(default=None, alias="artifactType")
    config: Descriptor
    layers: list[Descriptor]
    subject: Descriptor | None = None
    annotations: dict[str, str] | None = None

    def resolved_artifact_type(self) -> str:
        return self.artifact_type or self.config.media_type


class ImageIndex(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    schema_version: Literal[2] = Field(alias="schemaVersion")
    media_type: str | None = Field(default=None, alias="mediaType")
    artifact_type: str | None = Field(default=None, alias="artifactType")
    manifests: list[Descriptor]
    subject: Descriptor | None = None
    annotations: dict[str, str] | None = None


def canonical_json(value: Any) -> bytes:
    """Deterministic JSON bytes: sorted keys, no insignificant whitespace."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def parse_manifest(content: bytes, content_type: str | None) -> ImageManifest | ImageIndex:
    """Parse manifest bytes, taking the media type from the body or the header."""
    try:
        document = loads_bounded(content)
    except JsonTooDeep as exc:
        raise InvalidManifest(f"manifest is refused: {exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidManifest(f"manifest is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise InvalidManifest("manifest must be a JSON object")
    body_type = document.get("mediaType")
    header_type = (content_type or "").split(";")[0].strip() or None
    if body_type is not None and header_type is not None and body_type != header_type:
        raise InvalidManifest(
            f"Content-Type {header_type!r} does not match the manifest's mediaType {body_type!r}"
        )
    media_type = body_type or header_type
    if media_type is None:
        media_type = OCI_INDEX if "manifests" in document else OCI_MANIFEST
    if media_type not in MANIFEST_MEDIA_TYPES:
        raise InvalidManifest(f"unsupported manifest media type {media_type!r}")
    model: type[ImageManifest] | type[ImageIndex] = (
        ImageIndex if media_type in INDEX_MEDIA_TYPES else ImageManifest
    )
    try:
        parsed = model.model_validate(document)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "manifest"
        raise InvalidManifest(f"{where}: {first['msg']}") from None
    parsed.media_type = media_type
    return parsed
