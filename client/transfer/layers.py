"""The descriptors a pull reads from a manifest, checked without pydantic.

`peftreg.manifest.parse_manifest` (pydantic models) is what the registry
validates with; a pull reads only an image manifest's config and layers, and
does so with this reader to spare a small pull pydantic's import. The rules
are those of `parse_manifest` for the fields read (tests/unit/
test_manifest_layers.py holds the two to the same answers): an index is told
apart by its media type, and every descriptor needs a media type, a valid
digest and a size >= 0; annotations are strings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from peftreg.digest import Digest, InvalidDigest
from peftreg.formats.bounded_json import JsonTooDeep, loads_bounded
from peftreg.media_types import (
    INDEX_MEDIA_TYPES,
    MANIFEST_MEDIA_TYPES,
    OCI_INDEX,
    OCI_MANIFEST,
    InvalidManifest,
)


@dataclass(frozen=True)
class Layer:
    """A descriptor: the config or a layer of an image manifest."""

    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] | None


@dataclass(frozen=True)
class ImageLayers:
    config: Layer
    layers: list[Layer]


def _descriptor(value: Any, where: str) -> Layer:
    if not isinstance(value, dict):
        raise InvalidManifest(f"{where}: Input should be an object")
    media_type = value.get("mediaType")
    if not isinstance(media_type, str):
        raise InvalidManifest(f"{where}.mediaType: Field required, a string")
    digest = value.get("digest")
    if not isinstance(digest, str):
        raise InvalidManifest(f"{where}.digest: Field required, a string")
    try:
        Digest.parse(digest)
    except InvalidDigest as exc:
        raise InvalidManifest(f"{where}.digest: {exc}") from None
    size = value.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InvalidManifest(f"{where}.size: Field required, an integer >= 0")
    annotations = value.get("annotations")
    if annotations is not None and not (
        isinstance(annotations, dict)
        and all(isinstance(text, str) for text in annotations.values())
    ):
        raise InvalidManifest(f"{where}.annotations: strings only")
    return Layer(media_type, digest, size, annotations)


def read_image_layers(content: bytes) -> ImageLayers | None:
    """The config and layers of an image manifest; None for an index; or `InvalidManifest`."""
    try:
        document = loads_bounded(content)
    except JsonTooDeep as exc:
        raise InvalidManifest(f"manifest is refused: {exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidManifest(f"manifest is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise InvalidManifest("manifest must be a JSON object")
    media_type = document.get("mediaType")
    if media_type is None:
        media_type = OCI_INDEX if "manifests" in document else OCI_MANIFEST
    if media_type not in MANIFEST_MEDIA_TYPES:
        raise InvalidManifest(f"unsupported manifest media type {media_type!r}")
    if media_type in INDEX_MEDIA_TYPES:
        return None
    if document.get("schemaVersion") != 2 or isinstance(document.get("schemaVersion"), bool):
        raise InvalidManifest("schemaVersion: Input should be 2")
    layers = document.get("layers")
    if not isinstance(layers, list):
        raise InvalidManifest("layers: Field required, a list")
    return ImageLayers(
        config=_descriptor(document.get("config"), "config"),
        layers=[_descriptor(layer, f"layers.{index}") for index, layer in enumerate(layers)],
    )
