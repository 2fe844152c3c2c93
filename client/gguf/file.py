"""A GGUF file written as a stream: metadata and every tensor's info first, then the data.

`GgufStream` wraps the `gguf` package's `GGUFWriter`: tensors are declared
(name, GGML type, shape) before anything is written, so the header, the
key-values and the tensor infos go out first; then each tensor's bytes are
written in declaration order and checked against their declaration, whole
(`write`) or in blocks of rows (`write_rows`), so at most one tensor is held.
The file is written under a temporary name next to its final place, fsynced,
renamed into place and the directory fsynced: a failure or an interruption
leaves nothing at the output.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

import gguf
import numpy as np
from gguf.gguf_writer import WriterState
from numpy.typing import NDArray

from peftreg.checkpoint.writer import fsync_directory
from peftreg.gguf.tensor_types import stored_nbytes, stored_shape
from peftreg.sdk.errors import Conflict


def check_file_output(output: Path, *, replace: bool) -> None:
    """Conflict unless `output` is absent, or a file that may be replaced."""
    if output.is_dir():
        raise Conflict(f"{output} is a directory; name the .gguf file to write")
    if output.exists() and not replace:
        raise Conflict(f"{output} exists; pass --force to replace it")


class GgufStream:
    """Declare with `add_tensor_info`, `start`, then `write` each tensor in order; `commit`."""

    def __init__(self, output: Path, arch: str) -> None:
        self.output = Path(output).absolute()
        self.writer = gguf.GGUFWriter(path=None, arch=arch)
        self.staging = self.output.parent / f".{self.output.name}.peftreg-{uuid.uuid4().hex}"
        self._declared: list[tuple[str, gguf.GGMLQuantizationType, tuple[int, ...]]] = []
        self._written = 0

    def add_tensor_info(
        self, name: str, qtype: gguf.GGMLQuantizationType, shape: tuple[int, ...]
    ) -> None:
        """Declare a tensor of numpy `shape` (rows last) stored as `qtype`."""
        raw = stored_shape(shape, qtype)
        dtype: Any = {
            gguf.GGMLQuantizationType.F32: np.float32,
            gguf.GGMLQuantizationType.F16: np.float16,
        }.get(qtype, np.uint8)
        self.writer.add_tensor_info(
            name,
            raw,
            np.dtype(dtype),
            stored_nbytes(shape, qtype),
            raw_dtype=None if dtype is not np.uint8 else qtype,
        )
        self._declared.append((name, qtype, shape))

    def start(self) -> None:
        """Write the header, the key-values and the tensor infos."""
        self.output.parent.mkdir(parents=True, exist_ok=True)
        self.writer.write_header_to_file(self.staging)
        self.writer.write_kv_data_to_file()
        self.writer.write_ti_data_to_file()

    def write(self, name: str, data: NDArray[Any]) -> None:
        """The next declared tensor's stored bytes (from `tensor_types.encode`)."""
        expected, qtype, shape = self._declared[self._written]
        if name != expected or tuple(data.shape) != stored_shape(shape, qtype):
            raise ValueError(
                f"GGUF tensor {name} {list(data.shape)} written where {expected} "
                f"{list(stored_shape(shape, qtype))} was declared"
            )
        self.writer.write_tensor_data(np.ascontiguousarray(data))
        self._written += 1

    def write_rows(self, name: str, blocks: Iterable[NDArray[Any]]) -> None:
        """The next declared tensor's stored bytes in blocks of whole rows, in order: only
        one block is held at a time."""
        expected = self._declared[self._written][0]
        if name != expected:
            raise ValueError(f"GGUF tensor {name} written where {expected} was declared")
        writer = self.writer
        if writer.state not in (WriterState.TI_DATA, WriterState.WEIGHTS) or not writer.fout:
            raise ValueError(f"GGUF tensor data written before the header ({writer.state})")
        handle = writer.fout[0]
        info = writer.tensors[0].pop(name)
        writer.write_padding(handle, handle.tell())
        written = 0
        for block in blocks:
            data = np.ascontiguousarray(block)
            data.tofile(handle)
            written += data.nbytes
        if written != info.nbytes:
            raise ValueError(f"GGUF tensor {name}: {written} bytes written, {info.nbytes} declared")
        writer.write_padding(handle, written)
        writer.state = WriterState.WEIGHTS
        self._written += 1

    def commit(self) -> Path:
        if self._written != len(self._declared):
            raise ValueError(f"{len(self._declared) - self._written} GGUF tensors not written")
        assert self.writer.fout is not None
        for handle in self.writer.fout:
            handle.flush()
            os.fsync(handle.fileno())
        self.writer.close()
        os.replace(self.staging, self.output)
        fsync_directory(self.output.parent)
        return self.output

    def __enter__(self) -> GgufStream:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.writer.close()
        self.staging.unlink(missing_ok=True)


__all__ = ["GgufStream", "check_file_output"]
