"""Exported checkpoints as `application/vnd.peftreg.checkpoint.v1` artifacts.

The config blob is the recipe (`CheckpointConfig`): the base and adapter
digests and weights, the merge and quantization parameters, the library
versions and the producing job. The layers are the files of a Hugging Face
model directory (config.json with its quantization_config, safetensors
shards and index, tokenizer files). The manifest's `subject` is the source
adapter's manifest, so the referrers API on an adapter lists its exports.

Nothing time- or machine-dependent goes into the config or the manifest, so
the same recipe run twice yields the same manifest digest.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from peftreg.adapters.schema import layer_media_type
from peftreg.digest import digest_file
from peftreg.manifest import CHECKPOINT_ARTIFACT, canonical_json
from peftreg.transfer.push import LocalFile, build_manifest

CHECKPOINT_CONFIG_MEDIA_TYPE = "application/vnd.peftreg.checkpoint.config.v1+json"
JOB_ANNOTATION = "io.peftreg.job"
QUANTIZATION_ANNOTATION = "io.peftreg.checkpoint.quantization"
LIBRARIES = ("peftreg", "torch", "safetensors", "compressed-tensors", "gguf")


class SourceArtifact(BaseModel):
    model_config = ConfigDict(extra="forbid")

    repository: str
    digest: str
    weight: float | None = None


class CheckpointConfig(BaseModel):
    """Config blob of a checkpoint artifact: how it was made, exactly."""

    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = 1
    base: SourceArtifact
    base_fingerprint: str
    adapters: list[SourceArtifact]
    merge: dict[str, Any] = Field(description="dtype, base quantization, adapter kinds")
    quantization: dict[str, Any] = Field(description="the encoder's recipe")
    libraries: dict[str, str]
    job: str | None = None


def library_versions() -> dict[str, str]:
    versions: dict[str, str] = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def checkpoint_files(directory: Path) -> list[LocalFile]:
    """Every regular file at the top of a model directory, sorted by name."""
    return [
        LocalFile(item.name, item, *digest_file(item), layer_media_type(item.name))
        for item in sorted(directory.iterdir())
        if item.is_file()
    ]


@dataclass(frozen=True)
class CheckpointPackage:
    config: CheckpointConfig
    config_bytes: bytes
    files: list[LocalFile]
    manifest: bytes


def build_checkpoint_package(
    config: CheckpointConfig,
    directory: Path,
    *,
    subject: Mapping[str, Any] | None,
    annotations: Mapping[str, str] | None = None,
) -> CheckpointPackage:
    """The config blob, the files and the manifest for a model directory."""
    config_bytes = canonical_json(config.model_dump(mode="json"))
    files = checkpoint_files(directory)
    notes = {QUANTIZATION_ANNOTATION: str(config.quantization.get("quantization", "none"))}
    if config.job:
        notes[JOB_ANNOTATION] = config.job
    manifest = build_manifest(
        files,
        CHECKPOINT_ARTIFACT,
        {**notes, **dict(annotations or {})},
        (CHECKPOINT_CONFIG_MEDIA_TYPE, config_bytes),
        subject,
    )
    return CheckpointPackage(config, config_bytes, files, manifest)
