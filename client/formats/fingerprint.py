"""Base-model fingerprints that do not depend on how tensors are sharded.

fingerprint = sha256 of the canonical JSON list, sorted by tensor name, of
`[name, dtype, shape, sha256(tensor bytes)]`; the structure hash is the same
list without the data hashes. Computed streaming, one bounded read at a time,
so memory stays near one read buffer, never one tensor or one model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from peftreg.formats.safetensors_header import SafetensorsError, read_header
from peftreg.manifest import canonical_json

READ_CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class TensorRecord:
    name: str
    dtype: str
    shape: tuple[int, ...]
    sha256: str


@dataclass(frozen=True)
class BaseFingerprint:
    fingerprint: str
    structure_hash: str
    tensors: int
    parameters: int

    def as_dict(self) -> dict[str, object]:
        return {
            "fingerprint": self.fingerprint,
            "structure_hash": self.structure_hash,
            "tensors": self.tensors,
            "parameters": self.parameters,
        }


def tensor_records(path: Path) -> list[TensorRecord]:
    """Validate one safetensors file and hash each tensor's bytes."""
    size = path.stat().st_size
    records = []
    with path.open("rb") as stream:
        header = read_header(stream, size)
        for name, entry in sorted(header.tensors.items(), key=lambda item: item[1].begin):
            hasher = hashlib.sha256()
            stream.seek(header.data_start + entry.begin)
            remaining = entry.nbytes
            while remaining:
                chunk = stream.read(min(READ_CHUNK, remaining))
                if not chunk:
                    raise SafetensorsError(f"{path.name}: file ends inside tensor {name!r}")
                hasher.update(chunk)
                remaining -= len(chunk)
            records.append(TensorRecord(name, entry.dtype, entry.shape, hasher.hexdigest()))
    return records


def fingerprint_records(records: Iterable[TensorRecord]) -> BaseFingerprint:
    ordered = sorted(records, key=lambda r: r.name)
    names = [r.name for r in ordered]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise SafetensorsError(f"tensor {duplicates[0]!r} appears in more than one shard")
    full = [[r.name, r.dtype, list(r.shape), r.sha256] for r in ordered]
    structure = [[r.name, r.dtype, list(r.shape)] for r in ordered]
    parameters = 0
    for record in ordered:
        count = 1
        for dim in record.shape:
            count *= dim
        parameters += count
    return BaseFingerprint(
        fingerprint="sha256:" + hashlib.sha256(canonical_json(full)).hexdigest(),
        structure_hash="sha256:" + hashlib.sha256(canonical_json(structure)).hexdigest(),
        tensors=len(ordered),
        parameters=parameters,
    )


def fingerprint_directory(directory: Path) -> BaseFingerprint:
    """Fingerprint every `*.safetensors` file of a model directory together."""
    shards = sorted(directory.glob("*.safetensors"))
    if not shards:
        raise SafetensorsError(f"{directory} has no .safetensors files")
    records: list[TensorRecord] = []
    for shard in shards:
        try:
            records += tensor_records(shard)
        except SafetensorsError as exc:
            raise SafetensorsError(f"{shard.name}: {exc}") from None
    return fingerprint_records(records)
