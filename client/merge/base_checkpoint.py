"""A base model's safetensors shards, read one tensor at a time by byte range.

Only the headers are parsed up front (by the strict parser); no file is
mapped or loaded whole. `read` fills one reusable buffer with one tensor's
bytes (positioned reads into preallocated memory) and returns a tensor view
of it, valid until the next `read`. `chunks` streams a tensor's bytes through
a fixed-size buffer, for tensors copied to the output unchanged. So memory
stays near the largest tensor read whole, never near the model.

`buffer_capacity` and `bytes_read` make this bound observable to tests.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import torch

from peftreg.adapters.schema import TensorSpec
from peftreg.checkpoint.writer import INDEX_FILE, SAFETENSORS_DTYPES
from peftreg.formats.fingerprint import TensorRecord, fingerprint_records
from peftreg.formats.safetensors_header import SafetensorsError, read_header
from peftreg.merge.errors import MergeError

CHUNK_BYTES = 4 * 2**20


@dataclass(frozen=True)
class BaseTensor:
    """One tensor of the base: where its bytes lie and what they hold."""

    name: str
    dtype_name: str  # the safetensors dtype, e.g. "BF16"
    shape: tuple[int, ...]
    path: Path
    begin: int  # absolute file offsets
    end: int

    @property
    def dtype(self) -> torch.dtype:
        return SAFETENSORS_DTYPES[self.dtype_name]

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class BaseLayout:
    """What the headers alone tell about a base: its structure hash and tensors.

    Has no content fingerprint (that needs every byte hashed; see
    `peftreg.adapters.base_package.build_base_config`).
    """

    structure_hash: str
    tensors: list[TensorSpec]
    fingerprint: str | None = None


class BaseCheckpoint:
    """The `*.safetensors` shards of a model directory, indexed by tensor name."""

    def __init__(self, directory: Path, *, chunk_bytes: int = CHUNK_BYTES) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise MergeError(f"{self.directory} is not a directory")
        shards = model_shards(self.directory)
        self.tensors: list[BaseTensor] = []
        for shard in shards:
            self.tensors += _shard_tensors(shard)
        self.by_name: dict[str, BaseTensor] = {}
        for tensor in self.tensors:
            if tensor.name in self.by_name:
                raise MergeError(f"tensor {tensor.name!r} appears in more than one shard")
            self.by_name[tensor.name] = tensor
        self._chunk_bytes = chunk_bytes
        self._handles: dict[Path, io.FileIO] = {}
        self._buffer = torch.empty(0, dtype=torch.uint8)
        self._chunk = torch.empty(0, dtype=torch.uint8)
        self.bytes_read = 0

    @property
    def buffer_capacity(self) -> int:
        """Bytes held by the whole-tensor buffer and the chunk buffer together."""
        return self._buffer.numel() + self._chunk.numel()

    def layout(self) -> BaseLayout:
        """Structure hash and tensor specs, from the headers only."""
        # fingerprint_records computes the structure hash without the data hashes.
        records = [TensorRecord(t.name, t.dtype_name, t.shape, "") for t in self.tensors]
        try:
            structure_hash = fingerprint_records(records).structure_hash
        except SafetensorsError as exc:
            raise MergeError(str(exc)) from None
        specs = [
            TensorSpec(name=t.name, dtype=t.dtype_name, shape=t.shape)
            for t in sorted(self.tensors, key=lambda t: t.name)
        ]
        return BaseLayout(structure_hash=structure_hash, tensors=specs)

    def read(self, tensor: BaseTensor) -> torch.Tensor:
        """The tensor's values, a view of the reusable buffer: valid until the next read."""
        if self._buffer.numel() < tensor.nbytes:
            self._buffer = torch.empty(0, dtype=torch.uint8)  # release before growing
            self._buffer = torch.empty(tensor.nbytes, dtype=torch.uint8)
        target = self._buffer[: tensor.nbytes]
        self._read_into(tensor, tensor.begin, target.numpy().data)
        if tensor.nbytes == 0:
            return torch.empty(tensor.shape, dtype=tensor.dtype)
        return target.view(tensor.dtype).reshape(tensor.shape)

    def chunks(self, tensor: BaseTensor) -> Iterator[memoryview]:
        """The tensor's raw bytes in pieces of at most the chunk size, one buffer reused."""
        if self._chunk.numel() == 0 and tensor.nbytes:
            self._chunk = torch.empty(self._chunk_bytes, dtype=torch.uint8)
        view = self._chunk.numpy().data
        position = tensor.begin
        while position < tensor.end:
            size = min(self._chunk_bytes, tensor.end - position)
            self._read_into(tensor, position, view[:size])
            yield view[:size]
            position += size

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()
        self._buffer = torch.empty(0, dtype=torch.uint8)
        self._chunk = torch.empty(0, dtype=torch.uint8)

    def __enter__(self) -> BaseCheckpoint:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _read_into(self, tensor: BaseTensor, offset: int, target: memoryview) -> None:
        handle = self._handles.get(tensor.path)
        if handle is None:
            handle = io.FileIO(tensor.path, "rb")
            self._handles[tensor.path] = handle
        handle.seek(offset)
        done = 0
        while done < len(target):
            count = handle.readinto(target[done:])
            if not count:
                raise MergeError(f"{tensor.path.name}: the file ends inside tensor {tensor.name}")
            done += count
        self.bytes_read += done


def model_shards(directory: Path) -> list[Path]:
    """The shards `model.safetensors.index.json` names when there is one (a repository may
    hold other safetensors files, e.g. Mistral's `consolidated.safetensors`); else every
    `*.safetensors` file."""
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
            raise MergeError(f"{index} is not a safetensors index with a weight_map") from None
        shards = [directory / str(name) for name in names]
        missing = [shard.name for shard in shards if not shard.is_file()]
        if missing:
            raise MergeError(f"{INDEX_FILE} names {missing[0]}, which {directory} lacks")
    else:
        shards = sorted(directory.glob("*.safetensors"))
    if not shards:
        raise MergeError(f"{directory} has no .safetensors files")
    return shards


def _shard_tensors(path: Path) -> list[BaseTensor]:
    try:
        with path.open("rb") as stream:
            header = read_header(stream, path.stat().st_size)
    except SafetensorsError as exc:
        raise MergeError(f"{path.name}: {exc}") from None
    entries = sorted(header.tensors.values(), key=lambda e: e.begin)
    return [
        BaseTensor(
            name=entry.name,
            dtype_name=entry.dtype,
            shape=entry.shape,
            path=path,
            begin=header.data_start + entry.begin,
            end=header.data_start + entry.end,
        )
        for entry in entries
    ]
