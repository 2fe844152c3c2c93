"""Base models as `application/vnd.peftreg.base.v1` artifacts.

The config blob is a `BaseConfig`: the content fingerprint and structure hash
over every `*.safetensors` shard (independent of sharding), each tensor's
name/dtype/shape, and config.json's architecture, model_type and dtype. The
layers are the model directory's files a loader needs: config.json,
generation_config.json, tokenizer files, the shards and their index.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from peftreg.adapters.schema import (
    BASE_CONFIG_MEDIA_TYPE,
    BaseConfig,
    TensorSpec,
    layer_media_type,
)
from peftreg.digest import Digest, digest_file
from peftreg.formats.fingerprint import TensorRecord, fingerprint_records, tensor_records
from peftreg.formats.safetensors_header import SafetensorsError
from peftreg.manifest import BASE_ARTIFACT, OCI_MANIFEST, canonical_json
from peftreg.prompts.tokenizer import TOKENIZER_FILES
from peftreg.reference import Reference
from peftreg.sdk.client import Client
from peftreg.sdk.errors import InvalidRequest
from peftreg.transfer.push import LocalFile, build_manifest

BASE_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors.index.json",
    *TOKENIZER_FILES,
    "chat_template.jinja",
)


@dataclass(frozen=True)
class BasePackage:
    config: BaseConfig
    config_bytes: bytes
    files: list[LocalFile]

    def manifest(self, annotations: Mapping[str, str] | None = None) -> bytes:
        return build_manifest(
            self.files, BASE_ARTIFACT, annotations, (BASE_CONFIG_MEDIA_TYPE, self.config_bytes)
        )


def build_base_config(directory: Path) -> BaseConfig:
    """Fingerprint the shards of a model directory and describe it as a `BaseConfig`."""
    shards = sorted(directory.glob("*.safetensors"))
    if not shards:
        raise InvalidRequest(f"{directory} has no .safetensors files")
    records: list[TensorRecord] = []
    for shard in shards:
        try:
            records += tensor_records(shard)
        except SafetensorsError as exc:
            raise InvalidRequest(f"{shard.name}: {exc}") from None
    try:
        fingerprint = fingerprint_records(records)
    except SafetensorsError as exc:
        raise InvalidRequest(str(exc)) from None
    model_config: dict[str, object] = {}
    config_path = directory / "config.json"
    if config_path.is_file():
        model_config = json.loads(config_path.read_text())
    architectures = model_config.get("architectures")
    dtype = model_config.get("torch_dtype") or model_config.get("dtype")
    return BaseConfig(
        fingerprint=fingerprint.fingerprint,
        structure_hash=fingerprint.structure_hash,
        architecture=str(architectures[0])
        if isinstance(architectures, list) and architectures
        else None,
        model_type=str(model_config["model_type"]) if "model_type" in model_config else None,
        dtype=str(dtype) if dtype is not None else None,
        parameters=fingerprint.parameters,
        tensors=[
            TensorSpec(name=r.name, dtype=r.dtype, shape=r.shape)
            for r in sorted(records, key=lambda r: r.name)
        ],
    )


def build_base_package(directory: Path) -> BasePackage:
    if not directory.is_dir():
        raise InvalidRequest(f"{directory} is not a directory")
    config = build_base_config(directory)
    titles = sorted(
        item.name
        for item in directory.iterdir()
        if item.is_file() and (item.name in BASE_FILES or item.name.endswith(".safetensors"))
    )
    files = [
        LocalFile(
            title, directory / title, *digest_file(directory / title), layer_media_type(title)
        )
        for title in titles
    ]
    return BasePackage(config, canonical_json(config.model_dump(mode="json")), files)


def push_base(
    client: Client,
    directory: Path,
    reference: Reference | str,
    *,
    annotations: Mapping[str, str] | None = None,
) -> tuple[Digest, BasePackage]:
    """Upload the config blob and every file (skipping those present), then the manifest."""
    ref = reference if isinstance(reference, Reference) else Reference.parse(reference)
    package = build_base_package(directory)
    client.upload_blob(ref.repository, package.config_bytes)
    for item in package.files:
        client.upload_blob(ref.repository, item.path, item.digest)
    digest = client.put_manifest(ref, package.manifest(annotations), OCI_MANIFEST)
    return digest, package
