from __future__ import annotations

import json

import pytest

from peftreg.manifest import (
    EMPTY_JSON,
    EMPTY_JSON_DIGEST,
    OCI_INDEX,
    OCI_MANIFEST,
    ImageIndex,
    ImageManifest,
    InvalidManifest,
    canonical_json,
    parse_manifest,
)

LAYER = {"mediaType": "application/octet-stream", "digest": "sha256:" + "a" * 64, "size": 3}


def manifest(**extra: object) -> dict[str, object]:
    return {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": EMPTY_JSON, "digest": EMPTY_JSON_DIGEST, "size": 2},
        "layers": [LAYER],
        **extra,
    }


def test_artifact_type_falls_back_to_config_media_type() -> None:
    parsed = parse_manifest(canonical_json(manifest()), None)
    assert isinstance(parsed, ImageManifest)
    assert parsed.resolved_artifact_type() == EMPTY_JSON
    typed = parse_manifest(canonical_json(manifest(artifactType="application/x")), None)
    assert isinstance(typed, ImageManifest)
    assert typed.resolved_artifact_type() == "application/x"


def test_index_is_recognised_by_media_type() -> None:
    body = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [LAYER]}
    assert isinstance(parse_manifest(canonical_json(body), None), ImageIndex)


def test_media_type_comes_from_header_when_body_has_none() -> None:
    body = manifest()
    del body["mediaType"]
    parsed = parse_manifest(json.dumps(body).encode(), OCI_MANIFEST + "; charset=utf-8")
    assert parsed.media_type == OCI_MANIFEST


@pytest.mark.parametrize(
    ("content", "content_type", "message"),
    [
        (b"{not json", None, "not valid JSON"),
        (b"[1]", None, "JSON object"),
        (canonical_json(manifest()), OCI_INDEX, "does not match"),
        (canonical_json(manifest(mediaType="text/plain")), None, "unsupported manifest"),
        (canonical_json(manifest(schemaVersion=1)), None, "schemaVersion"),
        (canonical_json(manifest(layers=[{**LAYER, "digest": "sha256:x"}])), None, "layers"),
        (canonical_json(manifest(layers=[{**LAYER, "size": -1}])), None, "size"),
    ],
)
def test_invalid_manifests_name_the_problem(
    content: bytes, content_type: str | None, message: str
) -> None:
    with pytest.raises(InvalidManifest, match=message):
        parse_manifest(content, content_type)


def test_canonical_json_is_deterministic() -> None:
    assert canonical_json({"b": 1, "a": [2, {"d": 1, "c": 2}]}) == b'{"a":[2,{"c":2,"d":1}],"b":1}'


@pytest.mark.parametrize("depth", [65, 1000, 100_000])
def test_deeply_nested_json_is_an_invalid_manifest(depth: int) -> None:
    """Not a RecursionError: nesting beyond 64 levels is refused by name."""
    with pytest.raises(InvalidManifest, match="nests deeper than 64 levels"):
        parse_manifest(b"[" * depth + b"]" * depth, OCI_MANIFEST)
