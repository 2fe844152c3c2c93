"""OCI image manifests, indexes and descriptors as typed models.

A manifest's digest is over its exact bytes, so these models are used to
read and validate; `canonical_json` produces the bytes we push ourselves.
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from peftreg.digest import Digest
from peftreg.formats.bounded_json import JsonTooDeep, loads_bounded
from peftreg.media_types import (
    ADAPTER_ARTIFACT,
    ADAPTER_CONFIG_MEDIA_TYPE,
    BASE_ARTIFACT,
    CHECKPOINT_ARTIFACT,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    EMPTY_JSON,
    EMPTY_JSON_DIGEST,
    INDEX_MEDIA_TYPES,
    MANIFEST_MEDIA_TYPES,
    OCI_INDEX,
    OCI_MANIFEST,
    PROMPT_ARTIFACT,
    TITLE_ANNOTATION,
    InvalidManifest,
    canonical_json,
)

__all__ = [
    "ADAPTER_ARTIFACT",
    "ADAPTER_CONFIG_MEDIA_TYPE",
    "BASE_ARTIFACT",
    "CHECKPOINT_ARTIFACT",
    "DOCKER_MANIFEST",
    "DOCKER_MANIFEST_LIST",
    "EMPTY_JSON",
    "EMPTY_JSON_DIGEST",
    "INDEX_MEDIA_TYPES",
    "MANIFEST_MEDIA_TYPES",
    "OCI_INDEX",
    "OCI_MANIFEST",
    "PROMPT_ARTIFACT",
    "TITLE_ANNOTATION",
    "Descriptor",
    "ImageIndex",
    "ImageManifest",
    "InvalidManifest",
    "canonical_json",
    "parse_manifest",
]


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
