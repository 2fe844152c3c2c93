"""Rewrite a safetensors file with renamed tensors, copying the data bytes unchanged.

Only the header changes (names, and the metadata given); every tensor keeps its dtype,
shape and bytes, so a renamed file is exact by construction, and no tensor library is
needed.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

from peftreg.formats.safetensors_header import SafetensorsHeader


def write_renamed(
    source: Path,
    header: SafetensorsHeader,
    target: Path,
    rename: Callable[[str], str],
    *,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write `source` (whose parsed header is `header`) to `target` with every tensor
    `name` called `rename(name)`; atomic (a staging file renamed into place)."""
    document: dict[str, object] = {}
    if metadata:
        document["__metadata__"] = dict(metadata)
    for name, entry in sorted(header.tensors.items(), key=lambda item: item[1].begin):
        new_name = rename(name)
        if new_name in document:
            raise ValueError(f"two tensors would both be called {new_name!r}")
        document[new_name] = {
            "dtype": entry.dtype,
            "shape": list(entry.shape),
            "data_offsets": [entry.begin, entry.end],
        }
    raw = json.dumps(document, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    staging = target.with_name(f".{target.name}.partial")
    with source.open("rb") as reader, staging.open("wb") as writer:
        writer.write(struct.pack("<Q", len(raw)))
        writer.write(raw)
        reader.seek(header.data_start)
        shutil.copyfileobj(reader, writer)
        writer.flush()
        os.fsync(writer.fileno())
    os.replace(staging, target)
