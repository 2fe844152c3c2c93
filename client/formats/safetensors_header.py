"""A strict safetensors header parser, run before anything else reads a file.

Layout: bytes 0..7 hold a little-endian u64 N; bytes 8..8+N hold a JSON
object `{name: {"dtype", "shape", "data_offsets": [begin, end]},
"__metadata__": {str: str}}`; offsets are relative to the end of the header.

Checks (the reference loader's rules, plus bounds it relies on the OS for):
N within limits and within the file; the header is a JSON object without
duplicate keys; dtypes known; shapes lists of non-negative ints;
`end - begin == numel * itemsize`; tensors contiguous from offset 0 with no
overlap or gap, covering the data section exactly; metadata string to string.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any, Protocol

from peftreg.formats.bounded_json import JsonTooDeep, loads_bounded

MAX_HEADER_BYTES = 100_000_000
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}


class ReadableStream(Protocol):
    def read(self, size: int, /) -> bytes: ...


class SafetensorsError(ValueError):
    """A file that is not a well-formed safetensors file; the message names the problem."""


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class SafetensorsHeader:
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]
    data_start: int
    """Absolute file offset where the data section begins (8 + N)."""

    def absolute_range(self, name: str) -> tuple[int, int]:
        entry = self.tensors[name]
        return self.data_start + entry.begin, self.data_start + entry.end


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise SafetensorsError(f"header has duplicate key {key!r}")
        result[key] = value
    return result


def read_header(
    stream: ReadableStream, file_size: int, *, max_header_bytes: int = MAX_HEADER_BYTES
) -> SafetensorsHeader:
    """Parse and validate the header of a safetensors file of `file_size` bytes."""
    if file_size < 8:
        raise SafetensorsError(f"file is {file_size} bytes, too short for a safetensors header")
    prefix = stream.read(8)
    if len(prefix) != 8:
        raise SafetensorsError("file ends inside the header length")
    (length,) = struct.unpack("<Q", prefix)
    if length > max_header_bytes:
        raise SafetensorsError(f"header length {length} exceeds the {max_header_bytes}-byte limit")
    if 8 + length > file_size:
        raise SafetensorsError(
            f"header length {length} runs past the end of the {file_size}-byte file"
        )
    raw = stream.read(length)
    if len(raw) != length:
        raise SafetensorsError("file ends inside the header")
    return parse_header_bytes(raw, data_size=file_size - 8 - length)


def parse_header_bytes(raw: bytes, *, data_size: int) -> SafetensorsHeader:
    try:
        document = loads_bounded(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except JsonTooDeep as exc:
        raise SafetensorsError(f"header is refused: {exc}") from None
    except UnicodeDecodeError:
        raise SafetensorsError("header is not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise SafetensorsError(f"header is not valid JSON: {exc.msg} at byte {exc.pos}") from None
    if not isinstance(document, dict):
        raise SafetensorsError(f"header JSON is a {type(document).__name__}, not an object")
    metadata = _metadata(document.pop("__metadata__", None))
    entries = [_entry(name, value) for name, value in document.items()]
    _check_layout(entries, data_size)
    return SafetensorsHeader(
        tensors={entry.name: entry for entry in entries},
        metadata=metadata,
        data_start=8 + len(raw),
    )


def _metadata(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SafetensorsError("__metadata__ must be an object")
    for key, item in value.items():
        if not isinstance(item, str):
            raise SafetensorsError(f"__metadata__[{key!r}] must be a string")
    return dict(value)


def _entry(name: str, value: Any) -> TensorEntry:
    if not isinstance(value, dict):
        raise SafetensorsError(f"tensor {name!r}: entry must be an object")
    dtype, shape, offsets = value.get("dtype"), value.get("shape"), value.get("data_offsets")
    if dtype not in DTYPE_SIZES:
        raise SafetensorsError(f"tensor {name!r}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise SafetensorsError(f"tensor {name!r}: shape must be a list of non-negative integers")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
    ):
        raise SafetensorsError(f"tensor {name!r}: data_offsets must be [begin, end] integers")
    begin, end = offsets
    if end < begin:
        raise SafetensorsError(f"tensor {name!r}: data_offsets end {end} is before begin {begin}")
    entry = TensorEntry(name, dtype, tuple(shape), begin, end)
    expected = entry.numel * DTYPE_SIZES[dtype]
    if entry.nbytes != expected:
        raise SafetensorsError(
            f"tensor {name!r}: {entry.nbytes} bytes of data but dtype {dtype} and shape "
            f"{list(shape)} need {expected}"
        )
    return entry


def _check_layout(entries: list[TensorEntry], data_size: int) -> None:
    position = 0
    for entry in sorted(entries, key=lambda e: (e.begin, e.end)):
        if entry.end > data_size:
            raise SafetensorsError(
                f"tensor {entry.name!r}: data_offsets [{entry.begin}, {entry.end}] run past "
                f"the {data_size}-byte data section"
            )
        if entry.begin < position:
            raise SafetensorsError(
                f"tensor {entry.name!r}: data_offsets [{entry.begin}, {entry.end}] overlap "
                "another tensor"
            )
        if entry.begin > position:
            raise SafetensorsError(
                f"tensor {entry.name!r}: gap of {entry.begin - position} bytes before its data"
            )
        position = entry.end
    if position != data_size:
        raise SafetensorsError(
            f"data section is {data_size} bytes but tensors cover only {position}"
        )
