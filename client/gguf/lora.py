"""A LoRA adapter as a GGUF adapter file for llama.cpp's `--lora`.

The facts follow llama.cpp's `convert_lora_to_gguf.py`: `general.type` is
`adapter`, `adapter.type` is `lora`, `adapter.lora.alpha` the adapter's alpha,
and each target module gets two tensors named after the base's GGUF weight,
`<base tensor>.lora_a` (A, rank x in) and `<base tensor>.lora_b` (B, out x
rank). llama.cpp adds `scale * alpha / rank * B @ A @ x`.

Where PEFT's scaling is not `alpha / rank` (rsLoRA, per-module rank or alpha
patterns), B is multiplied by `scaling * rank / alpha`, so llama.cpp's
product is PEFT's delta exactly. On Llama, B's rows of q_proj and k_proj are
permuted as the base's Q/K rows are (`architecture.permute_rows`). NOLA
adapters are written as their materialized LoRA. DoRA (a per-row rescaling),
lora_B biases, LoRA on embeddings or Conv1D layers and full-weight
replacements (`modules_to_save`) have no GGUF LoRA form and are refused.
Factors are written in F32.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from peftreg.gguf.architecture import architecture_of, permute_rows
from peftreg.gguf.errors import GgufUnsupported
from peftreg.gguf.file import GgufStream, check_file_output
from peftreg.merge.inputs import AdapterInput, load_adapter

F32 = gguf.GGMLQuantizationType.F32


@dataclass(frozen=True)
class GgufLoraResult:
    output: Path
    modules: int
    alpha: float
    bytes_written: int


def _refuse_unsupported(adapter: AdapterInput, replacements: Mapping[str, Any]) -> None:
    if adapter.config.kind not in ("lora", "nola"):
        raise GgufUnsupported(
            f"{adapter.name} is a {adapter.config.kind} adapter; llama.cpp's --lora takes LoRA "
            "(and NOLA, written as its LoRA) only"
        )
    if replacements:
        names = ", ".join(sorted(replacements)[:3])
        raise GgufUnsupported(
            f"{adapter.name} saves full weights ({names}: modules_to_save or embeddings), "
            "which a GGUF LoRA cannot carry"
        )


def write_gguf_lora(
    adapter: AdapterInput,
    base_model_config: Mapping[str, Any],
    output: Path,
    *,
    replace: bool = False,
    name: str | None = None,
) -> GgufLoraResult:
    """Write `adapter` as the GGUF LoRA file `output` for the base described by its
    config.json (`base_model_config`: the architecture, and Llama's head counts)."""
    output = Path(output).absolute()
    arch = architecture_of(base_model_config)
    loaded = load_adapter(adapter)
    _refuse_unsupported(adapter, loaded.replacements)
    check_file_output(output, replace=replace)
    ranks = {factors.rank for factors in loaded.factors.values()}
    alpha = float(adapter.config.alpha or max(ranks))
    tensors: list[tuple[str, np.ndarray[Any, Any]]] = []
    for module, factors in sorted(loaded.factors.items()):
        if factors.layer != "linear" or factors.magnitude is not None or factors.bias is not None:
            what = (
                "a DoRA magnitude"
                if factors.magnitude is not None
                else "a lora_B bias"
                if factors.bias is not None
                else f"a {factors.layer} layer"
            )
            raise GgufUnsupported(f"{adapter.name}: {module} has {what}; no GGUF LoRA form")
        base_name = arch.tensor_name(f"{module}.weight")
        if base_name is None:
            raise GgufUnsupported(f"{adapter.name}: {module} has no GGUF tensor")
        a = factors.a.numpy().astype(np.float32)
        b = factors.b.numpy().astype(np.float32)
        factor = factors.scaling * factors.rank / alpha
        if factor != 1.0:
            b = b * np.float32(factor)
        heads = arch.heads_of(base_name)
        if heads is not None:
            b = permute_rows(b, heads)
        tensors.append((f"{base_name}.lora_a", np.ascontiguousarray(a)))
        tensors.append((f"{base_name}.lora_b", np.ascontiguousarray(b)))
    if not tensors:
        raise GgufUnsupported(f"{adapter.name} has no LoRA modules")
    with GgufStream(output, arch.name) as stream:
        writer = stream.writer
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_name(name or adapter.name)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        for tensor_name, value in tensors:
            stream.add_tensor_info(tensor_name, F32, tuple(value.shape))
        stream.start()
        for tensor_name, value in tensors:
            stream.write(tensor_name, value)
        stream.commit()
    return GgufLoraResult(output, len(tensors) // 2, alpha, output.stat().st_size)


__all__ = ["GgufLoraResult", "write_gguf_lora"]
