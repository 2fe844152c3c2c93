"""Adapters merged into their base and written as one GGUF model file for llama.cpp / Ollama.

The same streaming as `peftreg.merge.stream`: the base's headers are read,
the adapters checked against the base and planned (`plan_merge`), and the
architecture (`architecture.architecture_of`) and tokenizer (`vocab.read_vocab`)
checked, all before any tensor data is read; every GGUF tensor's name, type
and shape is then declared, so the file's header goes out first. Then each
base tensor, in file order, is read, merged in fp32 (`compute.merged_fp32`),
put in llama.cpp's row order (Llama's Q/K), encoded to its GGML type
(`tensor_types`) and written. As in the merge, a tensor whose rows are
independent (untouched, or LoRA on a Linear) is merged, encoded and written
in blocks of rows (`compute.row_factors`), so beside the read buffer only a
block is held in fp32: peak memory is the largest tensor plus a few MB.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from numpy.typing import NDArray

from peftreg.adapters.base_package import build_base_config
from peftreg.adapters.factors import merged_weight
from peftreg.adapters.schema import BaseConfig
from peftreg.checkpoint.encoding import CastEncoder
from peftreg.gguf.architecture import GgufArchitecture, architecture_of, permute_rows
from peftreg.gguf.errors import GgufUnsupported
from peftreg.gguf.file import GgufStream, check_file_output
from peftreg.gguf.tensor_types import FILE_TYPES, GGUF_QUANTIZATIONS, encode, tensor_type
from peftreg.gguf.vocab import read_vocab
from peftreg.merge.base_checkpoint import BaseCheckpoint
from peftreg.merge.compat import BaseIdentity, check_compatible
from peftreg.merge.compute import BLOCK_ELEMENTS, merged_fp32, row_blockable, row_factors
from peftreg.merge.destination import check_destination
from peftreg.merge.errors import MergeCancelled, MergeError
from peftreg.merge.inputs import AdapterInput, load_adapter
from peftreg.merge.model_dir import read_model_config
from peftreg.merge.plan import BaseQuantizationChoice, TensorPlan, plan_merge
from peftreg.merge.stream import resolve_device

logger = logging.getLogger(__name__)

Progress = Callable[[float, str], None]
RECIPE_KEY = "peftreg.recipe"  # the recipe, as JSON, in the file's own metadata


@dataclass(frozen=True)
class GgufResult:
    output: Path
    tensors: int
    bytes_written: int
    merged_modules: int
    seconds: float
    device: str
    recipe: dict[str, Any]
    tensor_types: dict[str, int] = field(default_factory=dict)


def gguf_file_name(quantization: str) -> str:
    """The file name an export job gives its GGUF model."""
    return f"model-{quantization}.gguf"


def check_gguf_base(model_config: dict[str, Any]) -> GgufArchitecture:
    """Refuse, from the base's config.json alone, a base with no GGUF form here."""
    return architecture_of(model_config)


@dataclass(frozen=True)
class _Planned:
    plan: TensorPlan
    name: str
    qtype: Any
    shape: tuple[int, ...]
    heads: int | None


def _identity(
    checkpoint: BaseCheckpoint, adapters: Sequence[AdapterInput], base_config: BaseConfig | None
) -> BaseIdentity:
    if base_config is not None:
        return base_config
    if any(adapter.config.base.fingerprint is not None for adapter in adapters):
        return build_base_config(checkpoint.directory)
    return checkpoint.layout()


def _declare(
    plans: Sequence[TensorPlan], arch: GgufArchitecture, quantization: str
) -> list[_Planned]:
    planned: list[_Planned] = []
    for plan in plans:
        name = arch.tensor_name(plan.source.name)
        if name is None:
            continue
        if plan.mode == "copy" and not plan.source.dtype.is_floating_point:
            raise GgufUnsupported(
                f"the base's {plan.source.name} is {plan.source.dtype_name}; GGUF export "
                "writes float weights only"
            )
        shape = tuple(plan.source.shape)
        planned.append(
            _Planned(
                plan,
                name,
                tensor_type(name, shape, quantization, arch.blocks),
                shape,
                arch.heads_of(name),
            )
        )
    return planned


def _untouched(plan: TensorPlan) -> bool:
    return not (plan.weight or plan.bias or plan.unchanged or plan.nf4) and (
        plan.replacement is None
    )


def _row_blocks(
    item: _Planned, value: torch.Tensor, device: torch.device, block_elements: int
) -> Iterator[NDArray[np.float32]]:
    """The tensor's merged fp32 values in llama.cpp's row order, in blocks of about
    `BLOCK_ELEMENTS` values (whole heads for Q/K), so no fp32 copy of a whole large tensor
    (an embedding) is made; tensors whose rows are not independent are merged whole."""
    plan = item.plan
    blockable = _untouched(plan) or row_blockable(plan)
    if value.dim() != 2 or not blockable:
        whole = merged_fp32(plan, value, device).to("cpu").numpy()
        yield whole if item.heads is None else permute_rows(whole, item.heads)
        return
    rows, columns = value.shape
    step = max(1, block_elements // max(1, columns))
    unit = rows // item.heads if item.heads else 1
    step = max(unit, step // unit * unit)
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        if plan.weight:
            parts = [(row_factors(f, start, stop), mix) for f, mix in plan.weight]
            block = merged_weight(value[start:stop], parts, device)
        else:
            block = value[start:stop].to(device, torch.float32)
        array = block.to("cpu").numpy()
        yield array if item.heads is None else permute_rows(array, (stop - start) // unit)


def export_gguf(
    base: Path | str,
    adapters: Sequence[AdapterInput],
    output: Path,
    *,
    quantization: str,
    base_config: BaseConfig | None = None,
    base_quantization: BaseQuantizationChoice = "none",
    device: str | torch.device = "auto",
    progress: Progress | None = None,
    cancelled: Callable[[], bool] | None = None,
    replace: bool = False,
    name: str | None = None,
    block_elements: int = BLOCK_ELEMENTS,
) -> GgufResult:
    """Merge `adapters` into the base directory `base` and write the GGUF file `output`
    (see the module doc). `quantization`: f16, q8_0, q4_0 or q4_k_m; `block_elements`:
    about how many values a block of rows holds."""
    started = time.perf_counter()
    if quantization not in GGUF_QUANTIZATIONS:
        raise MergeError(
            f"GGUF quantization {quantization!r} is not one of {', '.join(GGUF_QUANTIZATIONS)}"
        )
    output = Path(output).absolute()
    with BaseCheckpoint(Path(base)) as checkpoint:
        check_destination(output, checkpoint.directory, adapters)
        model_config = read_model_config(checkpoint.directory)
        arch = architecture_of(model_config)
        vocab = read_vocab(checkpoint.directory, int(model_config["vocab_size"]))
        tied = bool(model_config.get("tie_word_embeddings", False))
        identity = _identity(checkpoint, adapters, base_config)
        if adapters:
            check_compatible(identity, adapters, tied_embeddings=tied)
        check_file_output(output, replace=replace)
        compute_device = resolve_device(device)
        plan = plan_merge(
            checkpoint,
            [load_adapter(adapter) for adapter in adapters],
            dtype=torch.float32,
            base_quantization=base_quantization,
            encoder=CastEncoder(),
            tied_embeddings=tied,
        )
        planned = _declare(plan.tensors, arch, quantization)
        recipe = {
            "format": "gguf",
            "quantization": quantization,
            "architecture": arch.name,
            "tokenizer_pre": vocab.pre,
            "base": {
                "fingerprint": identity.fingerprint,
                "structure_hash": identity.structure_hash,
            },
            "adapters": [
                {"digest": a.digest, "kind": a.config.kind, "weight": a.weight} for a in adapters
            ],
            "base_quantization": base_quantization,
        }
        types: dict[str, int] = {}
        for item in planned:
            types[item.qtype.name] = types.get(item.qtype.name, 0) + 1
        total = sum(item.plan.source.nbytes for item in planned) or 1
        done = 0
        with GgufStream(output, arch.name) as stream:
            writer = stream.writer
            writer.add_name(name or str(model_config.get("_name_or_path") or output.stem))
            arch.add_metadata(writer, len(vocab.tokens))
            writer.add_file_type(FILE_TYPES[quantization])
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            vocab.add_to(writer)
            writer.add_string(RECIPE_KEY, json.dumps(recipe, sort_keys=True))
            for item in planned:
                stream.add_tensor_info(item.name, item.qtype, item.shape)
            stream.start()
            for item in planned:
                if cancelled is not None and cancelled():
                    raise MergeCancelled(f"GGUF export to {output} cancelled; nothing was written")
                value = checkpoint.read(item.plan.source)
                blocks = _row_blocks(item, value, compute_device, block_elements)
                stream.write_rows(item.name, (encode(block, item.qtype) for block in blocks))
                del value
                done += item.plan.source.nbytes
                if progress is not None:
                    progress(done / total, item.plan.source.name)
            stream.commit()
    seconds = time.perf_counter() - started
    logger.info("wrote GGUF %s", output, extra={"tensors": len(planned), "seconds": seconds})
    return GgufResult(
        output=output,
        tensors=len(planned),
        bytes_written=output.stat().st_size,
        merged_modules=plan.merged_modules,
        seconds=seconds,
        device=str(compute_device),
        recipe=recipe,
        tensor_types=types,
    )


__all__ = ["GgufResult", "check_gguf_base", "export_gguf", "gguf_file_name"]
