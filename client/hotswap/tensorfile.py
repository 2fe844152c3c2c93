"""An adapter's safetensors file read once: one header parse, one read, tensors as views.

A cold swap used to parse a directory's header three times (import, the
strict check before loading, the loader's own) and build each tensor in its
own allocation. Here the strict parser (`peftreg.formats.safetensors_header`)
runs once on the header bytes, which also name the directory
(`directory_identity`); the whole file is then read with one `readinto`
into one buffer, checked to still begin with those very header bytes, and
every tensor is a view of that buffer (a copy only for data that is not
aligned to its element size). The views of one buffer lie in file order,
which is what lets `largest_values` bound every float tensor in two
vectorized passes instead of one reduction per tensor.
"""

from __future__ import annotations

import contextlib
import io
import mmap
import os
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

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
        raw = prefix + stream.read(min(length, MAX_HEADER_BYTES))
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
    """Every tensor of the file `read` parsed, from one read of the whole file.

    Raises SwapError when the file was replaced or rewritten since its header
    was read (another size, time or inode, or other header bytes).
    """
    with read.path.open("rb") as stream:
        stat = _stat(stream)
        size = stat[0]
        if stat != read.stat:
            raise SwapError(f"{read.path} changed while it was loaded; swap again")
        buffer = allocate(size)
        got = stream.readinto(memoryview(buffer.numpy()))
    prefix = len(read.raw)
    if got != size or buffer[:prefix].numpy().tobytes() != read.raw:
        raise SwapError(f"{read.path} changed while it was loaded; swap again")
    return tensors_in(buffer, read.header)


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
        header = read_header(_Reader(memoryview(buffer.numpy())), buffer.numel())
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


def largest_values(tensors: Mapping[str, torch.Tensor]) -> dict[tuple[int, int], float]:
    """max |value| of every non-empty fp32 CPU tensor that is a contiguous view of one shared
    buffer, by `(data_ptr(), numel())`: one max and one min reduction (`reduceat`) per run of
    adjacent tensors. NaN wherever a tensor holds one. Tensors not covered are left to
    the caller."""
    spans: list[tuple[int, int, torch.Tensor]] = []
    for tensor in tensors.values():
        if (
            tensor.dtype == torch.float32
            and tensor.device.type == "cpu"
            and tensor.numel()
            and tensor.is_contiguous()
        ):
            spans.append((tensor.data_ptr(), tensor.numel(), tensor))
    spans.sort(key=lambda span: span[0])
    found: dict[tuple[int, int], float] = {}
    run: list[tuple[int, int, torch.Tensor]] = []
    for span in spans:
        if run and not _adjacent(run[-1], span):
            found.update(_run_largest(run))
            run = []
        run.append(span)
    if run:
        found.update(_run_largest(run))
    return found


def _adjacent(left: tuple[int, int, torch.Tensor], right: tuple[int, int, torch.Tensor]) -> bool:
    return (
        left[0] + 4 * left[1] == right[0]
        and left[2].untyped_storage().data_ptr() == right[2].untyped_storage().data_ptr()
    )


def _run_largest(run: list[tuple[int, int, torch.Tensor]]) -> dict[tuple[int, int], float]:
    first = run[0][2]
    total = sum(span[1] for span in run)
    flat = first.as_strided((total,), (1,), first.storage_offset()).numpy()
    starts = np.cumsum([0] + [span[1] for span in run[:-1]])
    peaks = np.maximum(np.maximum.reduceat(flat, starts), -np.minimum.reduceat(flat, starts))
    return {span[:2]: float(value) for span, value in zip(run, peaks.tolist(), strict=True)}
