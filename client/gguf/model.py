"""Adapters merged into their base and written as one GGUF model file for llama.cpp / Ollama.

The same streaming as `peftreg.merge.stream`: the base's headers are read,
the adapters checked against the base and planned (`plan_merge`), and the
architecture (`architecture.architecture_of`) and tokenizer (`vocab.read_vocab`)
checked, all before any tensor data is read; every GGUF tensor's name, type
and shape is then declared, so the file's header goes out first. Then each
base tensor, in file order, is read, merged in fp32 (`compute.merged_fp32`),
put in llama.cpp's row order (Llama's Q/K), encoded to its GGML type
(`tensor_types`) and written; one tensor is held at a time.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import torch

from peftreg.adapters.base_package import build_base_config
from peftreg.adapters.schema import BaseConfig
from peftreg.checkpoint.encoding import CastEncoder
from peftreg.gguf.architecture import GgufArchitecture, architecture_of, permute_rows
from peftreg.gguf.errors import GgufUnsupported
from peftreg.gguf.file import GgufStream, check_file_output
from peftreg.gguf.tensor_types import FILE_TYPES, GGUF_QUANTIZATIONS, encode, tensor_type
from peftreg.gguf.vocab import read_vocab
from peftreg.merge.base_checkpoint import BaseCheckpoint
from peftreg.merge.compat import BaseIdentity, check_compatible
from peftreg.merge.compute import merged_fp32
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
) -> GgufResult:
    """Merge `adapters` into the base directory `base` and write the GGUF file `output`
    (see the module doc). `quantization`: f16, q8_0, q4_0 or q4_k_m."""
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
                merged = merged_fp32(item.plan, value, compute_device).to("cpu").numpy()
                del value
                if item.heads is not None:
                    merged = permute_rows(merged, item.heads)
                stream.write(item.name, encode(merged, item.qtype))
                del merged
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
