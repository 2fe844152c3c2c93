"""Streaming safetensors checkpoints: every header is known first, tensor data follows in order.

A checkpoint's output tensors are planned (name, dtype, shape) before any data
is read, so `plan_shards` can assign them to shards and each shard's header
can be written up front. `CheckpointWriter` then takes the data in plan order,
checks each tensor against its plan (dtype, shape, byte count) and writes it
at its planned offset; the data is never gathered in memory.

Layout, as the safetensors library writes it: a little-endian u64 N, then N
bytes of compact JSON `{"__metadata__": {"format": "pt"}, name: {"dtype",
"shape", "data_offsets": [begin, end]}, ...}` padded with spaces so the data
section starts 8-byte aligned, then the tensors' bytes back to back. Within a
shard the data is laid out, as the safetensors library lays it out, by
decreasing element size (plan order among equal sizes): every size is a power
of two and every tensor's byte count a multiple of its own element size, so
each tensor starts at a multiple of its element size (readers that map a file
and view tensors in place need that). Tensors still arrive in plan order; each
is written at its offset.

Shards follow Hugging Face's rule: tensors are added in order and a new shard
starts when the next tensor would push the current one past `max_shard_bytes`
(a tensor larger than the limit gets a shard of its own). One shard is named
`model.safetensors`; several are `model-00001-of-00003.safetensors`, ... with a
`model.safetensors.index.json` (`metadata.total_size`, `weight_map`).

Durability: each shard and the index are fsynced when complete
(`write_durably` and `copy_durably` do the same for other files).
`StagedDirectory` builds an output directory next to its final place and, on
`commit`, fsyncs it, renames it into place and fsyncs the parent, so nothing
half-written is ever visible, even after a crash.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import torch

from peftreg.cache import remove_tree
from peftreg.checkpoint.encoding import PlannedTensor
from peftreg.sdk.errors import Conflict, InvalidRequest

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# 5 GB (10^9 bytes): transformers' `save_pretrained` default, and `peftreg merge`'s "5GB".
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
DEFAULT_METADATA: Mapping[str, str] = {"format": "pt"}

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E8M0": torch.float8_e8m0fnu,
    "I16": torch.int16,
    "U16": torch.uint16,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "F32": torch.float32,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F64": torch.float64,
}
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


class CheckpointWriteError(InvalidRequest):
    """Tensor data that does not match the plan, or a plan that cannot be written."""


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype (`torch.float16` -> `F16`)."""
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise CheckpointWriteError(f"safetensors cannot store dtype {dtype}") from None


@dataclass(frozen=True)
class PlannedShard:
    """One output file: its name, its tensors in plan order, where each one's data lies
    (offsets relative to the data section, in plan order) and its header bytes."""

    file_name: str
    tensors: tuple[PlannedTensor, ...]
    offsets: tuple[int, ...]
    header: bytes  # the u64 length prefix and the padded JSON

    @property
    def data_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def file_bytes(self) -> int:
        return len(self.header) + self.data_bytes


def shard_file_name(index: int, count: int) -> str:
    """`model.safetensors` alone; `model-00002-of-00003.safetensors` among several."""
    if count == 1:
        return SINGLE_FILE
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def storage_order(tensors: Sequence[PlannedTensor]) -> list[int]:
    """Indices of `tensors` in the order their data is laid out: decreasing element size,
    plan order among equal sizes (see the module doc)."""
    return sorted(range(len(tensors)), key=lambda index: -tensors[index].dtype.itemsize)


def data_offsets(tensors: Sequence[PlannedTensor]) -> list[int]:
    """Each tensor's data offset (in plan order), laid out in `storage_order`."""
    offsets = [0] * len(tensors)
    position = 0
    for index in storage_order(tensors):
        offsets[index] = position
        position += tensors[index].nbytes
    return offsets


def encode_header(
    tensors: Sequence[PlannedTensor], metadata: Mapping[str, str] = DEFAULT_METADATA
) -> bytes:
    """The u64 length and the JSON header (tensors in storage order), space-padded to
    8-byte alignment."""
    for tensor in tensors:
        dtype_name(tensor.dtype)  # refuses a dtype safetensors cannot store
    offsets = data_offsets(tensors)
    document: dict[str, object] = {"__metadata__": dict(metadata)}
    for index in storage_order(tensors):
        tensor = tensors[index]
        document[tensor.name] = {
            "dtype": dtype_name(tensor.dtype),
            "shape": list(tensor.shape),
            "data_offsets": [offsets[index], offsets[index] + tensor.nbytes],
        }
    raw = json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def plan_shards(
    tensors: Sequence[PlannedTensor],
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    metadata: Mapping[str, str] = DEFAULT_METADATA,
) -> list[PlannedShard]:
    """Assign tensors, in order, to shards of at most `max_shard_bytes` of data each."""
    if max_shard_bytes <= 0:
        raise CheckpointWriteError(f"max shard size must be positive, not {max_shard_bytes}")
    if not tensors:
        raise CheckpointWriteError("a checkpoint needs at least one tensor")
    seen: set[str] = set()
    groups: list[list[PlannedTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if tensor.name in seen:
            raise CheckpointWriteError(f"tensor {tensor.name!r} is planned twice")
        seen.add(tensor.name)
        if groups[-1] and size + tensor.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(tensor)
        size += tensor.nbytes
    return [
        PlannedShard(
            shard_file_name(index, len(groups)),
            tuple(group),
            tuple(data_offsets(group)),
            encode_header(group, metadata),
        )
        for index, group in enumerate(groups)
    ]


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A tensor's bytes (row-major, little-endian) as a view, on the CPU, without a copy
    when the tensor is already a contiguous CPU tensor."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().data.cast("B")


def _write_all(handle: io.FileIO, data: memoryview) -> int:
    done = 0
    total = len(data)
    while done < total:
        written = handle.write(data[done:])
        if not written:
            raise CheckpointWriteError(f"short write to {handle.name}")
        done += written
    return total


def fsync_directory(path: Path) -> None:
    """Make a directory's entries (files created or renamed in it) durable."""
    descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_durably(path: Path, data: bytes) -> None:
    """Create `path` with `data`, fsynced before it is closed."""
    with io.FileIO(path, "xb") as handle:
        _write_all(handle, memoryview(data))
        os.fsync(handle.fileno())


def copy_durably(source: Path, target: Path) -> None:
    """Copy a file's bytes to a new `target`, fsynced before it is closed."""
    with source.open("rb") as reader, io.FileIO(target, "xb") as handle:
        shutil.copyfileobj(reader, handle)
        os.fsync(handle.fileno())


class CheckpointWriter:
    """Writes planned safetensors shards (and the index) into `directory`, in plan order."""

    def __init__(
        self,
        directory: Path,
        tensors: Sequence[PlannedTensor],
        *,
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
        metadata: Mapping[str, str] = DEFAULT_METADATA,
    ) -> None:
        self.directory = Path(directory)
        self.shards = plan_shards(tensors, max_shard_bytes, metadata)
        self._queue = [
            (shard_index, t) for shard_index, s in enumerate(self.shards) for t in s.tensors
        ]
        self._offsets = [
            len(shard.header) + offset for shard in self.shards for offset in shard.offsets
        ]  # absolute file offsets, in _queue order
        self._position = 0  # index into _queue of the next tensor
        self._shard: int | None = None
        self._handle: io.FileIO | None = None
        self._shard_bytes = 0  # bytes written to the open shard
        self.bytes_written = 0

    # -- public API -----------------------------------------------------------------

    @property
    def shard_names(self) -> list[str]:
        return [shard.file_name for shard in self.shards]

    @property
    def next_tensor(self) -> PlannedTensor | None:
        """The tensor the writer expects next; None once every tensor is written."""
        if self._position >= len(self._queue):
            return None
        return self._queue[self._position][1]

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor; its name, dtype and shape must be the planned ones."""
        planned = self._expect(name)
        if tensor.dtype != planned.dtype:
            raise CheckpointWriteError(f"{name}: planned as {planned.dtype}, given {tensor.dtype}")
        if tuple(tensor.shape) != planned.shape:
            raise CheckpointWriteError(
                f"{name}: planned with shape {list(planned.shape)}, given {list(tensor.shape)}"
            )
        self._append(planned, [tensor_bytes(tensor)])

    def write_raw(self, name: str, chunks: Iterable[bytes | bytearray | memoryview]) -> None:
        """Append the next tensor from its raw bytes (already in the planned dtype)."""
        planned = self._expect(name)
        self._append(planned, (memoryview(chunk).cast("B") for chunk in chunks))

    def finish(self) -> list[str]:
        """Close the last shard, write the index when sharded; the shard file names."""
        pending = self.next_tensor
        if pending is not None:
            raise CheckpointWriteError(
                f"{len(self._queue) - self._position} planned tensors were never written, "
                f"starting with {pending.name}"
            )
        self._close_shard()
        if len(self.shards) > 1:
            index = {
                "metadata": {"total_size": sum(s.data_bytes for s in self.shards)},
                "weight_map": {
                    t.name: shard.file_name for shard in self.shards for t in shard.tensors
                },
            }
            write_durably(
                self.directory / INDEX_FILE, (json.dumps(index, indent=2) + "\n").encode()
            )
        return self.shard_names

    def close(self) -> None:
        """Release the open file, if any (after an error; `finish` closes normally)."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # -- internals --------------------------------------------------------------------

    def _expect(self, name: str) -> PlannedTensor:
        planned = self.next_tensor
        if planned is None:
            raise CheckpointWriteError(f"{name}: every planned tensor is already written")
        if planned.name != name:
            raise CheckpointWriteError(f"expected tensor {planned.name} next, given {name}")
        shard_index = self._queue[self._position][0]
        if self._shard != shard_index:
            self._open_shard(shard_index)
        return planned

    def _append(self, planned: PlannedTensor, chunks: Iterable[memoryview]) -> None:
        assert self._handle is not None
        self._handle.seek(self._offsets[self._position])
        total = 0
        for chunk in chunks:
            total += len(chunk)
            if total > planned.nbytes:
                raise CheckpointWriteError(
                    f"{planned.name}: more than the planned {planned.nbytes} bytes"
                )
            _write_all(self._handle, chunk)
        if total != planned.nbytes:
            raise CheckpointWriteError(
                f"{planned.name}: {total} bytes given, {planned.nbytes} planned"
            )
        self.bytes_written += total
        self._shard_bytes += total
        self._position += 1

    def _open_shard(self, index: int) -> None:
        self._close_shard()
        shard = self.shards[index]
        handle = io.FileIO(self.directory / shard.file_name, "xb")
        self._handle = handle
        self._shard = index
        _write_all(handle, memoryview(shard.header))
        self._shard_bytes = len(shard.header)
        self.bytes_written += len(shard.header)

    def _close_shard(self) -> None:
        if self._handle is None:
            return
        assert self._shard is not None
        expected = self.shards[self._shard].file_bytes
        written = self._shard_bytes
        if written == expected:
            os.fsync(self._handle.fileno())
        self.close()
        if written != expected:
            raise CheckpointWriteError(
                f"{self.shards[self._shard].file_name}: {written} bytes written, {expected} planned"
            )


class StagedDirectory:
    """An output directory built next to `output` and renamed into place on `commit`.

    Refuses (Conflict) a non-directory at `output`, or a non-empty directory
    unless `replace`. Leaving the block without `commit` removes the staging
    directory, so nothing appears at `output`. The files written into `path`
    must be made durable by their writers (`CheckpointWriter`, `write_durably`,
    `copy_durably`); `commit` makes the directory entries durable.
    """

    def __init__(self, output: Path, *, replace: bool = False) -> None:
        self.output = Path(output).absolute()
        self.replace = replace
        check_output(self.output, replace=replace)
        self.path = self.output.parent / f".{self.output.name}.peftreg-{uuid.uuid4().hex}"
        self._committed = False

    def __enter__(self) -> StagedDirectory:
        missing = [p for p in self.output.parents if not p.exists()]
        self.output.parent.mkdir(parents=True, exist_ok=True)
        for created in reversed(missing):  # outermost first: make each new entry durable
            fsync_directory(created.parent)
        self.path.mkdir()
        return self

    def commit(self) -> Path:
        """fsync the staging directory, rename it to `output` (a replaced output is moved
        aside first, and removed only once the new one is in place), fsync the parent."""
        check_output(self.output, replace=self.replace)
        fsync_directory(self.path)
        retired: Path | None = None
        if self.output.is_dir():
            retired = self.output.parent / f".{self.output.name}.peftreg-old-{uuid.uuid4().hex}"
            os.rename(self.output, retired)
        try:
            os.replace(self.path, self.output)
        except BaseException as error:
            if retired is not None:
                self._restore(retired, error)
            raise
        fsync_directory(self.output.parent)
        self._committed = True
        if retired is not None and retired.is_symlink():
            retired.unlink()  # a replaced symlink: its target is left as it is
        elif retired is not None:
            remove_tree(retired)
        return self.output

    def _restore(self, retired: Path, error: BaseException) -> None:
        """Put the replaced output back after a failed rename; never delete it."""
        try:
            os.rename(retired, self.output)
        except OSError as restore_error:
            logger.error(
                "could not restore %s after a failed replace; it is kept at %s",
                self.output,
                retired,
                extra={"output": str(self.output), "kept_at": str(retired)},
            )
            raise CheckpointWriteError(
                f"replacing {self.output} failed ({error}) and the previous directory could "
                f"not be put back ({restore_error}); it is kept at {retired}"
            ) from error

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if not self._committed:
            remove_tree(self.path)


def check_output(output: Path, *, replace: bool) -> None:
    """Conflict unless `output` is absent, an empty directory, or replaceable."""
    if output.exists() and not output.is_dir():
        raise Conflict(f"{output} exists and is not a directory")
    if output.is_dir() and any(output.iterdir()) and not replace:
        raise Conflict(f"{output} exists and is not empty; pass --force to replace it")


__all__ = [
    "DTYPE_NAMES",
    "INDEX_FILE",
    "SAFETENSORS_DTYPES",
    "SINGLE_FILE",
    "CheckpointWriteError",
    "CheckpointWriter",
    "PlannedShard",
    "StagedDirectory",
    "check_output",
    "copy_durably",
    "data_offsets",
    "dtype_name",
    "encode_header",
    "fsync_directory",
    "plan_shards",
    "shard_file_name",
    "storage_order",
    "write_durably",
]
