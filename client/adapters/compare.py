"""Compare two adapters: kind, rank, targets, and how far each common tensor moved.

What `peftreg diff` prints and the web UI's compare page shows. Tensors are
read one at a time through a `TensorValues` reader (numpy, no torch), so the
service compares stored blobs and the CLI compares cached files alike.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from peftreg.adapters.features import variants
from peftreg.adapters.validate import TensorValues, values_from_bytes
from peftreg.formats.safetensors_header import SafetensorsHeader, read_header

FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})
READ_STEP = 16 * 1024 * 1024


@dataclass(frozen=True)
class AdapterSide:
    """One adapter: its config document, its weights' header, and a reader of values."""

    config: Mapping[str, Any]
    header: SafetensorsHeader
    read_values: TensorValues


@dataclass(frozen=True)
class AdapterComparison:
    kind: tuple[Any, Any]
    variants: tuple[list[str], list[str]]
    """The features that change each kind's meaning (rsLoRA, aLoRA, ...)."""
    rank: tuple[Any, Any]
    targets_added: list[str]
    targets_removed: list[str]
    tensors_added: list[str]
    tensors_removed: list[str]
    relative_change: dict[str, float | None]
    """||a-b|| / ||a|| per common tensor; None where shape or dtype kind differs."""

    def as_json(self) -> dict[str, Any]:
        return {
            "kind": list(self.kind),
            "variants": list(self.variants),
            "rank": list(self.rank),
            "targets_added": self.targets_added,
            "targets_removed": self.targets_removed,
            "tensors_added": self.tensors_added,
            "tensors_removed": self.tensors_removed,
            "relative_change": self.relative_change,
        }


def _variants(config: Mapping[str, Any]) -> list[str]:
    peft_config = config.get("peft_config")
    return variants(peft_config) if isinstance(peft_config, dict) else []


def _values(side: AdapterSide, name: str) -> Any:
    import numpy as np

    pieces = [piece.astype(np.float64) for piece in side.read_values(name)]
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float64)


def _relative_change(a: AdapterSide, b: AdapterSide, name: str) -> float | None:
    import numpy as np

    entry_a, entry_b = a.header.tensors[name], b.header.tensors[name]
    if entry_a.shape != entry_b.shape or not {entry_a.dtype, entry_b.dtype} <= FLOAT_DTYPES:
        return None
    values_a, values_b = _values(a, name), _values(b, name)
    norm = float(np.linalg.norm(values_a))
    delta = float(np.linalg.norm(values_a - values_b))
    if norm > 0:
        return delta / norm
    return 0.0 if delta == 0 else float("inf")


def _modules(config: Mapping[str, Any]) -> set[str]:
    listed = [*(config.get("targets") or []), *(config.get("modules") or [])]
    return {str(target["module"]) for target in listed}


def compare_adapters(a: AdapterSide, b: AdapterSide) -> AdapterComparison:
    names_a, names_b = set(a.header.tensors), set(b.header.tensors)
    targets_a, targets_b = _modules(a.config), _modules(b.config)
    return AdapterComparison(
        kind=(a.config.get("kind"), b.config.get("kind")),
        variants=(_variants(a.config), _variants(b.config)),
        rank=(a.config.get("rank"), b.config.get("rank")),
        targets_added=sorted(targets_b - targets_a),
        targets_removed=sorted(targets_a - targets_b),
        tensors_added=sorted(names_b - names_a),
        tensors_removed=sorted(names_a - names_b),
        relative_change={name: _relative_change(a, b, name) for name in sorted(names_a & names_b)},
    )


def file_side(config: Mapping[str, Any], path: Path) -> AdapterSide:
    """An adapter whose weights are a local safetensors file (the CLI's cache)."""
    size = path.stat().st_size
    with path.open("rb") as stream:
        header = read_header(stream, size)

    def read_values(name: str) -> Any:
        entry = header.tensors[name]
        start, end = header.absolute_range(name)
        with path.open("rb") as handle:
            yield from _ranged(handle, entry, start, end)

    return AdapterSide(config=config, header=header, read_values=read_values)


def _ranged(handle: BinaryIO, entry: Any, start: int, end: int) -> Any:
    itemsize = entry.nbytes // entry.numel if entry.numel else 1
    step = max(itemsize, READ_STEP // itemsize * itemsize)
    handle.seek(start)
    for offset in range(start, end, step):
        yield values_from_bytes(handle.read(min(end, offset + step) - offset), entry)
