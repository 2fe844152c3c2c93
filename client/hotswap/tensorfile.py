"""An adapter's safetensors file read with one strict header parse.

A cold swap used to parse a directory's header twice with the strict parser
(`peftreg.formats.safetensors_header`: on import, and again before loading).
Here it runs once on the header bytes, which also name the directory
(`directory_identity`); the data is then loaded as long as the file is still
the one whose header was parsed. A pulled layer, already in memory to be
hashed, is parsed once and its tensors are views of that one buffer.
"""

from __future__ import annotations

import contextlib
import io
import mmap
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from peftreg.checkpoint.writer import SAFETENSORS_DTYPES
from peftreg.formats.safetensors_header import (
    MAX_HEADER_BYTES,
    SafetensorsError,
    SafetensorsHeader,
    read_header,
)
from peftreg.hotswap.errors import SwapError

HUGE_PAGE = 2 << 20


@dataclass(frozen=True)
class HeaderRead:
    """A tensors file's header as parsed, and its raw bytes (the u64 length and the JSON)."""

    path: Path
    header: SafetensorsHeader
    raw: bytes
    stat: tuple[int, int, int]  # the file's (size, mtime_ns, inode) when the header was read


def read_prefix(path: Path) -> HeaderRead:
    """Read and strictly parse the header of `path` (raises SafetensorsError)."""
    with path.open("rb") as stream:
        stat = _stat(stream)
        prefix = stream.read(8)
        length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else 0
        # a length past the limit or the file is refused by the parser, with nothing read
        fits = length <= MAX_HEADER_BYTES and 8 + length <= stat[0]
        raw = prefix + (stream.read(length) if fits else b"")
    header = read_header(io.BytesIO(raw), stat[0])
    return HeaderRead(path, header, raw[: header.data_start], stat)


def _stat(stream: io.BufferedReader) -> tuple[int, int, int]:
    """(size, mtime_ns, inode) of an open file."""
    result = os.fstat(stream.fileno())
    return result.st_size, result.st_mtime_ns, result.st_ino


def header_reader(reads: list[HeaderRead]) -> Callable[[Path], SafetensorsHeader]:
    """A header reader for `read_peft_directory` that keeps what it read in `reads`."""

    def read(path: Path) -> SafetensorsHeader:
        result = read_prefix(path)
        reads.append(result)
        return result.header

    return read


def load_file_once(read: HeaderRead) -> dict[str, torch.Tensor]:
    """Every tensor of the file `read` parsed, loaded without parsing strictly again.

    safetensors' loader reads the data (its allocations are small and reused
    from one load to the next, which one large fresh buffer is not). Raises
    SwapError when the file was replaced or rewritten since its header was
    read: another size, time or inode, or tensors other than the header's.
    """
    changed = SwapError(f"{read.path} changed while it was loaded; swap again")
    with read.path.open("rb") as stream:
        if _stat(stream) != read.stat:
            raise changed
        tensors = load_file(str(read.path), device="cpu")
        if _stat(stream) != read.stat or os.stat(read.path).st_ino != read.stat[2]:
            raise changed
    entries = read.header.tensors
    if tensors.keys() != entries.keys() or any(
        tuple(tensor.shape) != entries[name].shape
        or tensor.dtype != SAFETENSORS_DTYPES.get(entries[name].dtype)
        for name, tensor in tensors.items()
    ):
        raise changed
    return tensors


def allocate(size: int) -> torch.Tensor:
    """`size` bytes (uint8) of fresh memory for a file, on huge pages where the kernel
    offers them (`MADV_HUGEPAGE`): first-touch page faults of 4 KiB pages cost more
    than reading an adapter's file from the page cache."""
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if size < HUGE_PAGE or advice is None:
        return torch.empty(size, dtype=torch.uint8)
    memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(OSError):  # no transparent huge pages here: ordinary pages
        memory.madvise(advice)
    return torch.frombuffer(memory, dtype=torch.uint8)  # the tensor keeps `memory` alive


def tensors_in(buffer: torch.Tensor, header: SafetensorsHeader) -> dict[str, torch.Tensor]:
    """name -> tensor, views of `buffer` (uint8: the whole file) where aligned."""
    tensors = {}
    for name, entry in header.tensors.items():
        dtype = SAFETENSORS_DTYPES.get(entry.dtype)
        if dtype is None:
            raise SwapError(f"tensor {name!r}: dtype {entry.dtype} has no torch equivalent")
        begin = header.data_start + entry.begin
        raw = buffer[begin : header.data_start + entry.end]
        if begin % dtype.itemsize:
            raw = raw.clone()  # unaligned data: a copy of its own
        tensors[name] = raw.view(dtype).reshape(entry.shape)
    return tensors


def tensors_from_buffer(buffer: torch.Tensor, title: str) -> dict[str, torch.Tensor]:
    """A safetensors file held in memory (`buffer`, uint8), its header checked by the strict
    parser first; the tensors are views of `buffer`."""
    try:
        header = read_header(_Reader(buffer.numpy().data), buffer.numel())
    except SafetensorsError as exc:
        raise SwapError(f"{title}: {exc}") from None
    return tensors_in(buffer, header)


class _Reader:
    """Sequential reads of a buffer without copying the rest of it (as `io.BytesIO` would)."""

    def __init__(self, view: memoryview) -> None:
        self._view = view
        self._position = 0

    def read(self, size: int, /) -> bytes:
        chunk = bytes(self._view[self._position : self._position + size])
        self._position += len(chunk)
        return chunk
