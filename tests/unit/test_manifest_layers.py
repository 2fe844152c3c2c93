"""A pull's pydantic-free manifest reader gives the registry's models' answers."""

from __future__ import annotations

import pytest

from peftreg.manifest import (
    EMPTY_JSON,
    EMPTY_JSON_DIGEST,
    OCI_INDEX,
    OCI_MANIFEST,
    ImageManifest,
    InvalidManifest,
    canonical_json,
    parse_manifest,
)
from peftreg.transfer.layers import read_image_layers

LAYER = {
    "mediaType": "application/octet-stream",
    "digest": "sha256:" + "a" * 64,
    "size": 3,
    "annotations": {"org.opencontainers.image.title": "a.bin"},
}
CONFIG = {"mediaType": EMPTY_JSON, "digest": EMPTY_JSON_DIGEST, "size": 2}


def manifest(**extra: object) -> bytes:
    body: dict[str, object] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": CONFIG,
        "layers": [LAYER],
    }
    body.update(extra)
    return canonical_json({key: value for key, value in body.items() if value is not None})


VALID = {
    "one-layer": manifest(),
    "no-layers": manifest(layers=[]),
    "no-media-type": manifest(mediaType=None),
    "no-annotations": manifest(layers=[{**LAYER, "annotations": None}]),
    "extra-fields": manifest(layers=[{**LAYER, "urls": ["x"]}], subject=CONFIG),
}
INVALID = {
    "not-json": b"{not json",
    "not-object": b"[1]",
    "deep": b"[" * 100 + b"]" * 100,
    "media-type": manifest(mediaType="text/plain"),
    "schema-version": manifest(schemaVersion=1),
    "no-layers-field": manifest(layers=None),
    "no-config": manifest(config=None),
    "bad-digest": manifest(layers=[{**LAYER, "digest": "sha256:x"}]),
    "negative-size": manifest(layers=[{**LAYER, "size": -1}]),
    "no-size": manifest(layers=[{"mediaType": "a", "digest": LAYER["digest"]}]),
    "no-media-type-layer": manifest(layers=[{"digest": LAYER["digest"], "size": 1}]),
    "annotation-number": manifest(layers=[{**LAYER, "annotations": {"a": 1}}]),
    "layer-not-object": manifest(layers=["x"]),
}


@pytest.mark.parametrize("content", list(VALID.values()), ids=list(VALID))
def test_valid_manifests_read_alike(content: bytes) -> None:
    model = parse_manifest(content, None)
    lean = read_image_layers(content)
    assert isinstance(model, ImageManifest)
    assert lean is not None
    for ours, theirs in zip(
        [lean.config, *lean.layers], [model.config, *model.layers], strict=True
    ):
        assert (ours.media_type, ours.digest, ours.size, ours.annotations) == (
            theirs.media_type,
            theirs.digest,
            theirs.size,
            theirs.annotations,
        )


@pytest.mark.parametrize("content", list(INVALID.values()), ids=list(INVALID))
def test_invalid_manifests_are_refused_alike(content: bytes) -> None:
    with pytest.raises(InvalidManifest):
        parse_manifest(content, None)
    with pytest.raises(InvalidManifest):
        read_image_layers(content)


def test_an_index_is_no_image() -> None:
    body = canonical_json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [CONFIG]})
    assert read_image_layers(body) is None
    assert read_image_layers(canonical_json({"schemaVersion": 2, "manifests": []})) is None
