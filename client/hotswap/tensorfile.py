"""An adapter's safetensors file read with one strict header parse.

A cold swap used to parse a directory's header twice with the strict parser
(`peftreg.formats.safetensors_header`: on import, and again before loading).
Here it runs once on the header bytes, which also name the directory
(`directory_identity`), and not again for a header byte-identical to one
parsed before (adapters of one layout). The file is then read whole into a
pooled buffer whose pages are already faulted in, as long as it is still the
one whose header was parsed: in chunks, by the caller and a helper thread at
once (`PendingRead`; a chunk may be scanned for the values' bound while it is
in the CPU's cache, `SpanScan`); its tensors are views of that buffer. A
pulled layer, already in memory to be hashed, is parsed once and its tensors
are views of that one buffer too.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import math
import mmap
import os
import struct
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
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


class _ParsedHeaders:
    """The strict parser's results by (header bytes, file size), the last `max_entries`.

    The parse is a pure function of those two, and adapters of one layout
    (same modules, ranks and dtypes) have byte-identical headers: a cold load
    of a new adapter of a known layout does not parse its header again.
    """

    def __init__(self, max_entries: int = 32) -> None:
        self.max_entries = max_entries
        self._parsed: OrderedDict[tuple[bytes, int], SafetensorsHeader] = OrderedDict()
        self._lock = threading.Lock()

    def parse(self, raw: bytes, size: int) -> SafetensorsHeader:
        key = (raw, size)
        with self._lock:
            header = self._parsed.get(key)
            if header is not None:
                self._parsed.move_to_end(key)
                return header
        header = read_header(io.BytesIO(raw), size)  # raises SafetensorsError: not kept
        with self._lock:
            self._parsed[key] = header
            while len(self._parsed) > self.max_entries:
                self._parsed.popitem(last=False)
        return header


_PARSED = _ParsedHeaders()


def read_prefix(path: Path) -> HeaderRead:
    """Read and strictly parse the header of `path` (raises SafetensorsError)."""
    with path.open("rb") as stream:
        stat = _stat(stream)
        prefix = stream.read(8)
        length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else 0
        # a length past the limit or the file is refused by the parser, with nothing read
        fits = length <= MAX_HEADER_BYTES and 8 + length <= stat[0]
        raw = prefix + (stream.read(length) if fits else b"")
    header = _PARSED.parse(raw, stat[0])
    return HeaderRead(path, header, raw[: header.data_start], stat)


def _stat(stream: io.BufferedReader | io.FileIO) -> tuple[int, int, int]:
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


class BufferPool:
    """Reusable memory for whole tensors files, so that a cold load writes into pages
    already faulted in (first-touch faults of a fresh buffer cost more than the read).

    A buffer is a numpy array the pool keeps; the tensors of a loaded file are
    views of it and hold it alive. It is handed out again only once nothing
    but the pool refers to it (every adapter loaded from it was dropped: out
    of the LRU, no longer active, its staging programs pruned), so a cached
    adapter's values never change. At most `max_free` unused buffers are kept.
    """

    def __init__(self, max_free: int = 2) -> None:
        self.max_free = max_free
        self._buffers: list[np.ndarray] = []
        self._lock = threading.Lock()

    def take(self, size: int) -> torch.Tensor:
        """`size` bytes (uint8): a free buffer of the pool at least that large (at most
        twice), else a new one the pool keeps."""
        with self._lock:
            free = [index for index in range(len(self._buffers)) if self._is_free(index)]
            for index in free:
                if size <= self._buffers[index].nbytes <= 2 * size:
                    return torch.from_numpy(self._buffers[index])[:size]
            for index in reversed(free[self.max_free :]):
                del self._buffers[index]  # more unused buffers than kept: release some
            if size < HUGE_PAGE:
                return torch.empty(size, dtype=torch.uint8)
            buffer = allocate(size).numpy()
            self._buffers.append(buffer)
            return torch.from_numpy(buffer)

    def _is_free(self, index: int) -> bool:
        # references: the pool's list and getrefcount's argument; any tensor of the
        # buffer holds one more (through its storage)
        return sys.getrefcount(self._buffers[index]) <= 2

    def clear(self) -> None:
        with self._lock:
            self._buffers.clear()


FILE_BUFFERS = BufferPool()


def read_file_once(read: HeaderRead) -> dict[str, torch.Tensor]:
    """Every tensor of the file `read` parsed: one read of the whole file into a pooled
    buffer (`FILE_BUFFERS`), the tensors views of it, nothing parsed again.

    Raises SwapError when the file was replaced or rewritten since its header
    was read: another size, time or inode, or other header bytes.
    """
    return tensors_in(read_file_buffer(read), read.header)


CHUNK = 512 << 10  # bytes read at a time (and scanned while they are in the CPU's cache)


class SpanScan:
    """An upper bound of every |value| among the float32 values in bytes [begin, end) of
    a file, found while the file is read: each chunk is scanned right after it is read,
    while it is still in the CPU's cache, in one pass (its sum of squares, BLAS's dot).

    `begin` and `end` are multiples of 4 from the file's start, and so is every
    chunk's start. `bound` is sqrt(sum of squares) with a margin for the float32
    rounding of the sum, so never below the largest |value|. It is not finite
    when a value is NaN or infinite, or when the squares overflow (values beyond
    ~1e19: the caller then finds the largest values exactly), and NaN until the
    whole span was scanned. Chunks may be scanned in any order, by any thread.
    """

    MARGIN = 1.0 + 2.0**-8  # relative: far above float32 accumulation error in a chunk

    def __init__(self, begin: int, end: int) -> None:
        self.begin, self.end = begin, end
        self._squares: list[tuple[int, float]] = []  # (bytes scanned, sum of squares)

    def add(self, data: np.ndarray, start: int, stop: int) -> None:
        """Scan what of bytes [start, stop) of `data` (uint8, the file) is in the span."""
        start, stop = max(start, self.begin), min(stop, self.end)
        if stop <= start:
            return
        values = data[start:stop].view(np.float32)
        self._squares.append((stop - start, float(np.dot(values, values))))  # (atomic)

    @property
    def bound(self) -> float:
        scanned = sum(count for count, _value in self._squares)
        if self.begin >= self.end or scanned != self.end - self.begin:
            return math.nan
        return math.sqrt(sum(value for _count, value in self._squares)) * self.MARGIN


_PREADV = hasattr(os, "preadv")  # reads at an offset, from any thread (not on Windows)


class _Helper:
    """One thread that reads chunks beside the caller (the kernel's copies, and the scan,
    run without the GIL: two cores copy at once, and the caller's Python goes on)."""

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def submit(self, work: Callable[[], None]) -> Future[None]:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(1, thread_name_prefix="peftreg-read")
            return self._executor.submit(work)


_HELPER = _Helper()


class PendingRead:
    """A tensors file being read into a pooled buffer, chunk by chunk, by a helper thread
    and (in `wait`) the caller: views of `buffer` may be made at once, and are valid
    once `wait` returned. `scan` is given every chunk as it is read."""

    def __init__(self, read: HeaderRead, scan: SpanScan | None) -> None:
        self.read = read
        self.scan = scan
        self._changed = SwapError(f"{read.path} changed while it was loaded; swap again")
        self._stream = read.path.open("rb", buffering=0)
        try:
            if _stat(self._stream) != read.stat:
                raise self._changed
            self.size = read.stat[0]
            self.buffer = FILE_BUFFERS.take(self.size)
        except BaseException:
            self._stream.close()
            raise
        self._view = self.buffer.numpy().data
        self._array = self.buffer.numpy()
        self._chunks = itertools.count()  # the next chunk to read (next() is atomic)
        self._count = -(-self.size // CHUNK)
        self._short = False
        self._helper: Future[None] | None = None
        if self._count > 1 and _PREADV:
            self._helper = _HELPER.submit(self._work)

    def _work(self) -> None:
        fd = self._stream.fileno()
        while not self._short:
            index = next(self._chunks)
            if index >= self._count:
                return
            start = index * CHUNK
            stop = min(self.size, start + CHUNK)
            done = start
            while done < stop:
                if _PREADV:
                    count = os.preadv(fd, [self._view[done:stop]], done)
                else:  # (no helper thread: the caller alone reads, in order)
                    os.lseek(fd, done, os.SEEK_SET)
                    count = self._stream.readinto(self._view[done:stop]) or 0
                if not count:
                    self._short = True  # the file shrank
                    return
                done += count
            if self.scan is not None:
                self.scan.add(self._array, start, stop)

    def wait(self) -> torch.Tensor:
        """The buffer, every byte read; raises SwapError when the file was replaced or
        rewritten since its header was read (another size, time or inode, or other header
        bytes)."""
        read = self.read
        try:
            self._work()
            helper = self._helper
            if helper is not None and not helper.cancel():
                helper.result()
            if (
                self._short
                or _stat(self._stream) != read.stat
                or os.stat(read.path).st_ino != read.stat[2]
            ):
                raise self._changed
        finally:
            self._stream.close()
        if bytes(self._view[: len(read.raw)]) != read.raw:
            raise self._changed
        return self.buffer


def read_file_buffer(read: HeaderRead, scan: SpanScan | None = None) -> torch.Tensor:
    """The whole file `read` parsed, in a pooled buffer (uint8; see `read_file_once`);
    `scan` is given every chunk as it is read."""
    return PendingRead(read, scan).wait()


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
    typed: dict[torch.dtype, torch.Tensor] = {}  # the buffer as each dtype (one view each)
    for name, entry in header.tensors.items():
        dtype = SAFETENSORS_DTYPES.get(entry.dtype)
        if dtype is None:
            raise SwapError(f"tensor {name!r}: dtype {entry.dtype} has no torch equivalent")
        begin = header.data_start + entry.begin
        size = dtype.itemsize
        if begin % size or buffer.numel() % size or not entry.shape:
            raw = buffer[begin : header.data_start + entry.end]
            if begin % size:
                raw = raw.clone()  # unaligned data: a copy of its own
            tensors[name] = raw.view(dtype).reshape(entry.shape)
            continue
        whole = typed.get(dtype)
        if whole is None:
            whole = typed[dtype] = buffer.view(dtype)
        tensors[name] = whole.as_strided(entry.shape, _strides(entry.shape), begin // size)
    return tensors


def _strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A contiguous tensor's strides, in elements."""
    strides = [1] * len(shape)
    for index in range(len(shape) - 2, -1, -1):
        strides[index] = strides[index + 1] * max(shape[index + 1], 1)
    return tuple(strides)


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
