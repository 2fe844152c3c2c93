"""Merge adapters into a base model directory, one tensor at a time, into a new model directory.

The same code serves the registry's merge jobs and the local `peftreg merge`.

1. Before any tensor data is read: the base's headers are parsed, the
   adapters checked against the base (`compat.check_compatible`: fingerprints,
   kinds), their factors loaded (adapter tensors are small), matched to base
   tensors and every output tensor planned through the encoder
   (`plan.plan_merge`), so each shard's header is known.
2. Then each base tensor, in file order, is read by byte range and copied
   through, cast, or merged in fp32 on the device and cast once
   (`compute.TensorMerger`), then streamed into the writer. Only one base
   tensor is held at a time.
3. config.json (dtype, the encoder's `quantization_config`, extra keys) and
   the tokenizer and generation files are written, every file is fsynced, and
   the staging directory is fsynced, renamed into place and its parent
   fsynced. On any error or cancellation nothing is left at the output.

Before any of this, an output that would overwrite or contain an input (the
base or an adapter directory) is refused (`destination.check_destination`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from peftreg.adapters.base_package import build_base_config
from peftreg.adapters.schema import BaseConfig
from peftreg.checkpoint.encoding import CastEncoder, TensorEncoder
from peftreg.checkpoint.writer import (
    DEFAULT_MAX_SHARD_BYTES,
    CheckpointWriter,
    StagedDirectory,
    check_output,
)
from peftreg.merge.base_checkpoint import BaseCheckpoint
from peftreg.merge.compat import BaseIdentity, check_compatible
from peftreg.merge.compute import TensorMerger
from peftreg.merge.destination import check_destination
from peftreg.merge.errors import MergeCancelled, MergeError
from peftreg.merge.inputs import AdapterInput, load_adapter
from peftreg.merge.model_dir import (
    dtype_label,
    output_model_config,
    read_model_config,
    write_model_files,
)
from peftreg.merge.plan import BaseQuantizationChoice, plan_merge

logger = logging.getLogger(__name__)

Progress = Callable[[float, str], None]
OUTPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class MergeResult:
    output: Path
    shards: list[str]
    tensors: int  # tensors written
    bytes_written: int  # bytes of the safetensors shards
    merged_modules: int  # target modules changed by an adapter
    seconds: float
    device: str
    recipe: dict[str, Any]  # what was merged and how, for provenance
    notes: list[str] = field(default_factory=list)  # advice to show the user


def resolve_device(device: str | torch.device) -> torch.device:
    """`auto`: CUDA when available, else the CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise MergeError("device cuda was asked for, but CUDA is not available here")
    return resolved


def _base_identity(
    checkpoint: BaseCheckpoint, adapters: Sequence[AdapterInput], base_config: BaseConfig | None
) -> BaseIdentity:
    """The given BaseConfig; else the full fingerprint when an adapter records one (every
    byte hashed), else the structure read from the headers alone."""
    if base_config is not None:
        return base_config
    if any(adapter.config.base.fingerprint is not None for adapter in adapters):
        return build_base_config(checkpoint.directory)
    return checkpoint.layout()


def _notes(adapters: Sequence[AdapterInput], base_quantization: str) -> list[str]:
    notes = []
    for adapter in adapters:
        trained = adapter.config.base.quantization
        if trained == "nf4" and base_quantization != "nf4":
            notes.append(
                f"{adapter.name} was trained against an NF4-quantized base (QLoRA); merge with "
                "base quantization nf4 to add it to the dequantized weights it saw"
            )
        elif trained not in ("none", "nf4"):
            notes.append(
                f"{adapter.name} was trained against a {trained}-quantized base; it is merged "
                "into the unquantized weights"
            )
    return notes


def _recipe(
    identity: BaseIdentity,
    adapters: Sequence[AdapterInput],
    dtype: torch.dtype | None,
    base_quantization: str,
    encoder: TensorEncoder,
) -> dict[str, Any]:
    return {
        "base": {"fingerprint": identity.fingerprint, "structure_hash": identity.structure_hash},
        "adapters": [
            {"digest": a.digest, "kind": a.config.kind, "weight": a.weight} for a in adapters
        ],
        "dtype": dtype_label(dtype) if dtype is not None else None,
        "base_quantization": base_quantization,
        "encoding": encoder.recipe(),
    }


@contextmanager
def _opened(base: Path | str | BaseCheckpoint) -> Iterator[BaseCheckpoint]:
    if isinstance(base, BaseCheckpoint):
        yield base
        return
    with BaseCheckpoint(Path(base)) as checkpoint:
        yield checkpoint


def merge_to_directory(
    base: Path | str | BaseCheckpoint,
    adapters: Sequence[AdapterInput],
    output: Path,
    *,
    base_config: BaseConfig | None = None,
    dtype: torch.dtype | None = None,
    base_quantization: BaseQuantizationChoice = "none",
    encoder: TensorEncoder | None = None,
    device: str | torch.device = "auto",
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: Progress | None = None,
    cancelled: Callable[[], bool] | None = None,
    config_extra: Mapping[str, Any] | None = None,
    replace: bool = False,
) -> MergeResult:
    """Merge `adapters` (summed with their weights) into the base in `base`, writing a
    Hugging Face model directory at `output` (see the module doc).

    `dtype`: the output's float dtype (each tensor's own by default; non-float
    tensors pass through). `base_quantization="nf4"`: merge into the
    NF4-dequantized Linear weights a QLoRA adapter was trained against.
    `cancelled()` is polled between tensors (MergeCancelled, nothing left at
    `output`); `progress(fraction, tensor name)` is called after each tensor.
    `replace`: replace a non-empty `output` (Conflict otherwise). An output that is,
    contains or lies inside the base directory, or is or contains an adapter's
    directory, is refused (`destination.check_destination`).

    `base` is the base model directory, or an open `BaseCheckpoint` (the reader seam).
    """
    started = time.perf_counter()
    with _opened(base) as checkpoint:
        encoder = encoder or CastEncoder()
        if dtype is not None and dtype not in OUTPUT_DTYPES:
            raise MergeError(f"output dtype {dtype} is not one of float16, bfloat16, float32")
        if base_quantization not in ("none", "nf4"):
            raise MergeError(f"base quantization {base_quantization!r} is not none or nf4")
        output = Path(output).absolute()
        check_destination(output, checkpoint.directory, adapters)
        model_config = read_model_config(checkpoint.directory)
        tied = bool(model_config.get("tie_word_embeddings", False))
        identity = _base_identity(checkpoint, adapters, base_config)
        check_compatible(identity, adapters, tied_embeddings=tied)
        check_output(output, replace=replace)
        compute_device = resolve_device(device)
        plan = plan_merge(
            checkpoint,
            [load_adapter(adapter, model_config) for adapter in adapters],
            dtype=dtype,
            base_quantization=base_quantization,
            encoder=encoder,
            tied_embeddings=tied,
        )
        config_update = encoder.config_update()
        outputs = plan.outputs
        total = sum(item.source.nbytes for item in plan.tensors) or 1
        done = 0
        with StagedDirectory(output, replace=replace) as staging:
            with CheckpointWriter(staging.path, outputs, max_shard_bytes=max_shard_bytes) as writer:
                merger = TensorMerger(checkpoint, writer, encoder, compute_device)
                for item in plan.tensors:
                    if cancelled is not None and cancelled():
                        raise MergeCancelled(f"merge into {output} cancelled; nothing was written")
                    merger.write(item)
                    done += item.source.nbytes
                    if progress is not None:
                        progress(done / total, item.source.name)
                shards = writer.finish()
                written = writer.bytes_written
            document = output_model_config(model_config, dtype, config_update, config_extra)
            write_model_files(checkpoint.directory, staging.path, document)
            if cancelled is not None and cancelled():
                raise MergeCancelled(f"merge into {output} cancelled; nothing was written")
            staging.commit()
        seconds = time.perf_counter() - started
        logger.info(
            "merged %d adapters into %s",
            len(adapters),
            output,
            extra={"tensors": len(outputs), "bytes": written, "seconds": round(seconds, 3)},
        )
        return MergeResult(
            output=output,
            shards=shards,
            tensors=len(outputs),
            bytes_written=written,
            merged_modules=plan.merged_modules,
            seconds=seconds,
            device=str(compute_device),
            recipe=_recipe(identity, adapters, dtype, base_quantization, encoder),
            notes=_notes(adapters, base_quantization),
        )


__all__ = [
    "MergeResult",
    "merge_to_directory",
    "read_model_config",  # re-exported: callers building an encoder for the base read it here
    "resolve_device",
]
