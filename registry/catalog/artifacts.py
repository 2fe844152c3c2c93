"""Adapter, base and hard-prompt artifacts: validated when their manifest is put, then indexed.

Hard prompts (`application/vnd.peftreg.prompt.v1`): see `peftreg.registry.catalog.prompts`.

An artifact is checked when its manifest declares `artifactType`
`application/vnd.peftreg.adapter.v1` (or `.base.v1`) and a config blob of the
matching peftreg config media type; other manifests are stored as opaque
OCI artifacts.

Adapters: the config parses as `AdapterConfig`; the one safetensors layer's
header is range-read first and parsed by the strict parser; then tensors are
read one at a time (absolute ranges) to refuse NaN / Inf; when a base with
`config.base.fingerprint` is registered, shapes are checked against it and
the adapter is indexed as verified, otherwise it is accepted unverified.

Bases: the config parses as `BaseConfig` with its fingerprints; every
safetensors shard's header is valid, and together the headers hash to the
config's structure hash and list exactly its tensors. Tensor data is not
rehashed at push (the client computed the fingerprint).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from peftreg.adapters.schema import (
    ADAPTER_CONFIG_MEDIA_TYPE,
    BASE_CONFIG_MEDIA_TYPE,
    NOLA_SAFETENSORS_MEDIA_TYPE,
    SAFETENSORS_MEDIA_TYPE,
    AdapterConfig,
    BaseConfig,
)

if TYPE_CHECKING:
    import numpy as np

from peftreg.adapters.validate import (
    AdapterInvalid,
    max_rank,
    structure_hash_of,
    validate_adapter,
    values_from_bytes,
)
from peftreg.digest import Digest
from peftreg.formats.safetensors_header import SafetensorsError, SafetensorsHeader, read_header
from peftreg.manifest import (
    ADAPTER_ARTIFACT,
    BASE_ARTIFACT,
    PROMPT_ARTIFACT,
    TITLE_ANNOTATION,
    Descriptor,
    ImageIndex,
    ImageManifest,
)
from peftreg.registry.db.models import ArtifactIndex, Manifest
from peftreg.registry.errors import ArtifactInvalid, SafetensorsInvalid
from peftreg.registry.storage.base import BlobReader
from peftreg.registry.storage.errors import BlobNotFound

MAX_CONFIG_BYTES = 16 * 1024 * 1024
MAX_ADAPTER_DATA_BYTES = 2 * 1024 * 1024 * 1024
# Headers of real adapters and shards are kilobytes to a few MiB; parsing an
# untrusted 100 MB JSON header would build gigabytes of Python objects.
MAX_PUSHED_HEADER_BYTES = 16 * 1024 * 1024
VALUE_READ_BYTES = 16 * 1024 * 1024
WEIGHT_MEDIA_TYPES = (SAFETENSORS_MEDIA_TYPE, NOLA_SAFETENSORS_MEDIA_TYPE)


class _RangeStream:
    """A forward-only stream over a stored blob, read by absolute ranges."""

    def __init__(self, store: BlobReader, digest: Digest, size: int) -> None:
        self.store, self.digest, self.size, self.position = store, digest, size, 0

    def read(self, count: int) -> bytes:
        end = min(self.position + count, self.size)
        data = _read_range(self.store, self.digest, self.position, end)
        self.position += len(data)
        return data


def _read_range(store: BlobReader, digest: Digest, start: int, end: int) -> bytes:
    if end <= start:
        return b""
    return b"".join(store.read(digest, start, end))


def _blob_size(store: BlobReader, digest: str) -> int:
    try:
        return store.stat(Digest.parse(digest))
    except BlobNotFound:
        raise ArtifactInvalid(f"blob {digest} is not in the store") from None


def _read_json_config(store: BlobReader, descriptor: Descriptor) -> bytes:
    size = _blob_size(store, descriptor.digest)
    if size > MAX_CONFIG_BYTES:
        raise ArtifactInvalid(
            f"config blob is {size} bytes; the limit is {MAX_CONFIG_BYTES}",
            detail={"limit": MAX_CONFIG_BYTES},
        )
    return _read_range(store, Digest.parse(descriptor.digest), 0, size)


def _parse_config(data: bytes, model: type[AdapterConfig] | type[BaseConfig]) -> object:
    try:
        return model.model_validate_json(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "config"
        raise ArtifactInvalid(
            f"{model.__name__} config invalid at {where}: {first['msg']}",
            detail={"location": where},
        ) from None


def _title(layer: Descriptor) -> str:
    return (layer.annotations or {}).get(TITLE_ANNOTATION, "")


def read_safetensors_header(
    store: BlobReader, digest: str, *, label: str
) -> tuple[SafetensorsHeader, int]:
    """The strict parse of a stored safetensors blob's header; (header, blob size)."""
    size = _blob_size(store, digest)
    try:
        header = read_header(
            _RangeStream(store, Digest.parse(digest), size),
            size,
            max_header_bytes=MAX_PUSHED_HEADER_BYTES,
        )
    except SafetensorsError as exc:
        raise SafetensorsInvalid(
            f"{label}: {exc}", detail={"layer": label, "digest": digest}
        ) from None
    return header, size


def inspect_artifact(
    session: Session, store: BlobReader, parsed: ImageManifest | ImageIndex
) -> ArtifactIndex | None:
    """Validate an adapter or base artifact; its (unsaved) index row, or None for others."""
    if not isinstance(parsed, ImageManifest):
        return None
    from peftreg.prompts.schema import PROMPT_CONFIG_MEDIA_TYPE

    expected = {
        ADAPTER_ARTIFACT: ADAPTER_CONFIG_MEDIA_TYPE,
        BASE_ARTIFACT: BASE_CONFIG_MEDIA_TYPE,
        PROMPT_ARTIFACT: PROMPT_CONFIG_MEDIA_TYPE,
    }
    artifact_type = parsed.resolved_artifact_type()
    if artifact_type not in expected:
        return None
    if parsed.config.media_type != expected[artifact_type]:
        # Claiming the type without its config would skip every check.
        raise ArtifactInvalid(
            f"a {artifact_type} artifact needs a config of media type "
            f"{expected[artifact_type]}, not {parsed.config.media_type}",
            detail={"config_media_type": parsed.config.media_type},
        )
    if artifact_type == ADAPTER_ARTIFACT:
        return _inspect_adapter(session, store, parsed)
    if artifact_type == PROMPT_ARTIFACT:
        from peftreg.registry.catalog.prompts import inspect_prompt

        return inspect_prompt(session, store, parsed)
    return _inspect_base(store, parsed)


def weights_layer(parsed: ImageManifest) -> Descriptor:
    layers = [layer for layer in parsed.layers if layer.media_type in WEIGHT_MEDIA_TYPES]
    if not layers:
        layers = [layer for layer in parsed.layers if _title(layer).endswith(".safetensors")]
    if len(layers) != 1:
        raise ArtifactInvalid(
            f"an adapter artifact needs exactly one safetensors layer, found {len(layers)}"
        )
    return layers[0]


def _inspect_adapter(session: Session, store: BlobReader, parsed: ImageManifest) -> ArtifactIndex:
    config = _parse_config(_read_json_config(store, parsed.config), AdapterConfig)
    assert isinstance(config, AdapterConfig)
    layer = weights_layer(parsed)
    label = _title(layer) or layer.digest
    header, _size = read_safetensors_header(store, layer.digest, label=label)
    data_bytes = sum(entry.nbytes for entry in header.tensors.values())
    if data_bytes > MAX_ADAPTER_DATA_BYTES:
        raise ArtifactInvalid(
            f"{label}: {data_bytes} bytes of tensors; adapters are limited to "
            f"{MAX_ADAPTER_DATA_BYTES}"
        )
    digest = Digest.parse(layer.digest)

    def read_values(name: str) -> Iterator[np.ndarray[Any, Any]]:
        entry = header.tensors[name]
        start, end = header.absolute_range(name)
        itemsize = entry.nbytes // entry.numel if entry.numel else 1
        step = max(itemsize, VALUE_READ_BYTES // itemsize * itemsize)
        for offset in range(start, end, step):
            data = _read_range(store, digest, offset, min(end, offset + step))
            if len(data) != min(end, offset + step) - offset:
                raise SafetensorsInvalid(f"{label}: file ends inside tensor {name!r}")
            yield values_from_bytes(data, entry)

    base = _registered_base(session, store, config.base.fingerprint)
    try:
        validate_adapter(config, header, read_values, base)
    except AdapterInvalid as exc:
        raise ArtifactInvalid(
            f"{label}: {exc.message}", detail={"location": exc.location, "layer": label}
        ) from None
    return ArtifactIndex(
        kind=config.kind,
        base_fingerprint=config.base.fingerprint,
        base_structure_hash=config.base.structure_hash,
        max_rank=max_rank(config),
        base_quantization=config.base.quantization,
        verified=base is not None,
        fingerprint=None,
    )


def _registered_base(
    session: Session, store: BlobReader, fingerprint: str | None
) -> BaseConfig | None:
    if not fingerprint:
        return None
    rows = session.scalars(
        select(Manifest.config_digest)
        .join(ArtifactIndex, ArtifactIndex.manifest_id == Manifest.id)
        .where(ArtifactIndex.kind == "base", ArtifactIndex.fingerprint == fingerprint)
        .order_by(Manifest.id)
        .limit(1)
    )
    for config_digest in rows:
        if config_digest is None:
            continue
        try:
            data = _read_range(
                store, Digest.parse(config_digest), 0, store.stat(Digest.parse(config_digest))
            )
            return BaseConfig.model_validate_json(data)
        except (BlobNotFound, ValidationError, json.JSONDecodeError):
            return None
    return None


def _shards(parsed: ImageManifest) -> Iterator[Descriptor]:
    for layer in parsed.layers:
        if layer.media_type == SAFETENSORS_MEDIA_TYPE or _title(layer).endswith(".safetensors"):
            yield layer


def _inspect_base(store: BlobReader, parsed: ImageManifest) -> ArtifactIndex:
    config = _parse_config(_read_json_config(store, parsed.config), BaseConfig)
    assert isinstance(config, BaseConfig)
    for field in ("fingerprint", "structure_hash"):
        value = getattr(config, field)
        if not value.startswith("sha256:") or len(value) != 71:
            raise ArtifactInvalid(f"base config {field} {value!r} is not a sha256 digest")
    seen: dict[str, tuple[str, tuple[int, ...]]] = {}
    shards = list(_shards(parsed))
    if not shards:
        raise ArtifactInvalid("a base artifact needs at least one safetensors shard")
    for layer in shards:
        label = _title(layer) or layer.digest
        header, _size = read_safetensors_header(store, layer.digest, label=label)
        for name, entry in header.tensors.items():
            if name in seen:
                raise ArtifactInvalid(f"{label}: tensor {name!r} appears in more than one shard")
            seen[name] = (entry.dtype, entry.shape)
    declared = {spec.name: (spec.dtype, tuple(spec.shape)) for spec in config.tensors}
    if declared != seen:
        extra = sorted(set(seen) - set(declared))
        missing = sorted(set(declared) - set(seen))
        differ = sorted(n for n in set(seen) & set(declared) if seen[n] != declared[n])
        raise ArtifactInvalid(
            "base config tensors do not match the shards: "
            f"undeclared {extra[:5]}, missing {missing[:5]}, different {differ[:5]}"
        )
    computed = structure_hash_of([(n, d, s) for n, (d, s) in seen.items()])
    if computed != config.structure_hash:
        raise ArtifactInvalid(
            f"the shards' structure hash is {computed}, the config says {config.structure_hash}"
        )
    return ArtifactIndex(
        kind="base",
        base_fingerprint=None,
        base_structure_hash=config.structure_hash,
        max_rank=None,
        base_quantization=None,
        verified=True,
        fingerprint=config.fingerprint,
    )
