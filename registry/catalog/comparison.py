"""Two stored adapters compared, by the library's `compare_adapters`."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from sqlalchemy.orm import Session

from peftreg.adapters.compare import AdapterComparison, AdapterSide, compare_adapters
from peftreg.adapters.validate import values_from_bytes
from peftreg.digest import Digest
from peftreg.manifest import ADAPTER_ARTIFACT, ImageManifest, parse_manifest
from peftreg.registry.catalog import manifests
from peftreg.registry.catalog.artifacts import read_safetensors_header, weights_layer
from peftreg.registry.catalog.documents import read_json_blob
from peftreg.registry.errors import InvalidRequest
from peftreg.registry.storage.base import BlobReader

READ_STEP = 16 * 1024 * 1024


def stored_adapter(
    session: Session, store: BlobReader, *, repository: str, reference: str
) -> AdapterSide:
    """The adapter `repository` holds at `reference` (authorize read first)."""
    row = manifests.get_manifest(session, repository=repository, reference=reference)
    parsed = parse_manifest(row.content, row.media_type)
    if not isinstance(parsed, ImageManifest) or parsed.resolved_artifact_type() != ADAPTER_ARTIFACT:
        raise InvalidRequest(f"{repository}@{row.digest} is not an adapter artifact")
    config = read_json_blob(store, row.config_digest)
    if not isinstance(config, dict):
        raise InvalidRequest(f"{repository}@{row.digest}: its config blob cannot be read")
    layer = weights_layer(parsed)
    header, _size = read_safetensors_header(store, layer.digest, label=layer.digest)
    digest = Digest.parse(layer.digest)

    def read_values(name: str) -> Iterator[Any]:
        entry = header.tensors[name]
        start, end = header.absolute_range(name)
        itemsize = entry.nbytes // entry.numel if entry.numel else 1
        step = max(itemsize, READ_STEP // itemsize * itemsize)
        for offset in range(start, end, step):
            data = b"".join(store.read(digest, offset, min(end, offset + step)))
            yield values_from_bytes(data, entry)

    return AdapterSide(config=config, header=header, read_values=read_values)


def compare_stored(
    session: Session,
    store: BlobReader,
    *,
    first: tuple[str, str],
    second: tuple[str, str],
) -> AdapterComparison:
    side_a = stored_adapter(session, store, repository=first[0], reference=first[1])
    side_b = stored_adapter(session, store, repository=second[0], reference=second[1])
    return compare_adapters(side_a, side_b)
