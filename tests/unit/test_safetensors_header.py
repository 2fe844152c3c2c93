"""Our header parser against the reference loader, on valid and malformed files."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from peftreg.formats.safetensors_header import SafetensorsError, read_header


def raw_file(path: Path, header: Any, data: bytes, *, length: int | None = None) -> Path:
    encoded = header if isinstance(header, bytes) else json.dumps(header).encode()
    size = len(encoded) if length is None else length
    path.write_bytes(struct.pack("<Q", size) + encoded + data)
    return path


F32_1 = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}

# (case id, header, data bytes, header-length override, words the error must contain)
MALFORMED: list[tuple[str, Any, bytes, int | None, str]] = [
    ("length-past-end", {"a": F32_1}, b"\0" * 4, 10_000, "past the end"),
    ("length-huge", {"a": F32_1}, b"\0" * 4, 2**63, "exceeds"),
    ("not-json", b"{not json", b"", None, "not valid JSON"),
    ("not-utf8", b"\xff\xfe{}", b"", None, "not UTF-8"),
    ("json-array", [1, 2], b"", None, "not an object"),
    ("json-string", "x", b"", None, "not an object"),
    ("unknown-dtype", {"a": {**F32_1, "dtype": "F33"}}, b"\0" * 4, None, "unknown dtype"),
    ("size-mismatch", {"a": {**F32_1, "shape": [2]}}, b"\0" * 4, None, "need 8"),
    ("offsets-out-of-range", {"a": {**F32_1, "data_offsets": [0, 4]}}, b"", None, "run past"),
    (
        "overlap",
        {
            "a": {**F32_1, "shape": [2], "data_offsets": [0, 8]},
            "b": {**F32_1, "data_offsets": [4, 8]},
        },
        b"\0" * 8,
        None,
        "overlap",
    ),
    (
        "gap",
        {"a": F32_1, "b": {**F32_1, "data_offsets": [8, 12]}},
        b"\0" * 12,
        None,
        "gap",
    ),
    ("trailing-bytes", {"a": F32_1}, b"\0" * 8, None, "cover only"),
    ("end-before-begin", {"a": {**F32_1, "data_offsets": [4, 0]}}, b"\0" * 4, None, "before begin"),
    ("negative-shape", {"a": {**F32_1, "shape": [-1]}}, b"\0" * 4, None, "non-negative"),
    ("offsets-not-pair", {"a": {**F32_1, "data_offsets": [0]}}, b"\0" * 4, None, "data_offsets"),
    ("entry-not-object", {"a": [1]}, b"", None, "must be an object"),
    ("metadata-not-strings", {"__metadata__": {"x": 1}, "a": F32_1}, b"\0" * 4, None, "string"),
    (
        "duplicate-key",
        b'{"a":' + json.dumps(F32_1).encode() + b',"a":' + json.dumps(F32_1).encode() + b"}",
        b"\0" * 4,
        None,
        "duplicate",
    ),
    ("too-short", None, b"", None, "too short"),
]


@pytest.mark.parametrize(
    ("header", "data", "length", "words"),
    [case[1:] for case in MALFORMED],
    ids=[case[0] for case in MALFORMED],
)
def test_malformed_headers_are_refused_with_the_cause(
    tmp_path: Path, header: Any, data: bytes, length: int | None, words: str
) -> None:
    path = tmp_path / "bad.safetensors"
    if header is None:
        path.write_bytes(b"\x01\x02")
    else:
        raw_file(path, header, data, length=length)
    with path.open("rb") as stream, pytest.raises(SafetensorsError, match=words):
        read_header(stream, path.stat().st_size)


def test_valid_file_matches_the_reference(tmp_path: Path) -> None:
    tensors = {
        "w": torch.randn(3, 5),
        "b": torch.zeros(5, dtype=torch.bfloat16),
        "ids": torch.arange(4, dtype=torch.int64),
        "empty": torch.zeros(0, 3),
    }
    path = tmp_path / "ok.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    with path.open("rb") as stream:
        header = read_header(stream, path.stat().st_size)
    assert header.metadata == {"format": "pt"}
    assert set(header.tensors) == set(load_file(str(path)))
    assert header.tensors["w"].shape == (3, 5)
    assert header.tensors["b"].dtype == "BF16"
    start, end = header.absolute_range("ids")
    raw = path.read_bytes()[start:end]
    assert torch.frombuffer(bytearray(raw), dtype=torch.int64).tolist() == [0, 1, 2, 3]
