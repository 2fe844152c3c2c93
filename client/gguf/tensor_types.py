"""Which GGML type each tensor of a GGUF file gets, and its bytes.

The mix follows llama.cpp's `llama-quantize` for the four file types offered:

- 1-D tensors (norms, biases) stay F32, in every file type;
- `f16`: F16; `q8_0`: Q8_0;
- `q4_0`: Q4_0, but the output head (`output.weight`) Q6_K;
- `q4_k_m`: Q4_K, but the output head Q6_K, and `attn_v` / `ffn_down` of the
  layers `use_more_bits` picks (the first and last eighth, and every third
  between) Q6_K.

A row length that the chosen type's block does not divide falls back as
llama.cpp does (Q4_K -> Q5_0, Q6_K -> Q8_0), and to F16 when no 32-value
block divides it either. Q8_0, Q4_0 and Q5_0 are encoded by the `gguf`
package; Q4_K and Q6_K by `peftreg.gguf.kquants`.
"""

from __future__ import annotations

import gguf
import numpy as np
from numpy.typing import NDArray

from peftreg.gguf.formats import GGUF_QUANTIZATIONS, GgufQuantization
from peftreg.gguf.kquants import quantize_q4_k, quantize_q6_k

T = gguf.GGMLQuantizationType
FILE_TYPES: dict[str, gguf.LlamaFileType] = {
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    "q4_k_m": gguf.LlamaFileType.MOSTLY_Q4_K_M,
}
_DEFAULT = {"f16": T.F16, "q8_0": T.Q8_0, "q4_0": T.Q4_0, "q4_k_m": T.Q4_K}
_FALLBACK = {T.Q4_K: T.Q5_0, T.Q6_K: T.Q8_0}


def use_more_bits(index: int, count: int) -> bool:
    """llama.cpp's choice of the layers that keep more bits in a K-quant mix."""
    return index < count // 8 or index >= 7 * count // 8 or (index - count // 8) % 3 == 2


def _block_index(name: str) -> int | None:
    if not name.startswith("blk."):
        return None
    return int(name.split(".")[1])


def _wanted(name: str, quantization: str, blocks: int) -> gguf.GGMLQuantizationType:
    if quantization in ("q4_0", "q4_k_m") and name == "output.weight":
        return T.Q6_K
    index = _block_index(name)
    if (
        quantization == "q4_k_m"
        and index is not None
        and (name.endswith(".attn_v.weight") or name.endswith(".ffn_down.weight"))
        and use_more_bits(index, blocks)
    ):
        return T.Q6_K
    return _DEFAULT[quantization]


def tensor_type(
    name: str, shape: tuple[int, ...], quantization: str, blocks: int
) -> gguf.GGMLQuantizationType:
    """The GGML type of the GGUF tensor `name` of (numpy) `shape` in a `quantization` file."""
    if len(shape) < 2:
        return T.F32
    wanted = _wanted(name, quantization, blocks)
    row = shape[-1]
    while wanted not in (T.F16, T.F32):
        block, _ = gguf.GGML_QUANT_SIZES[wanted]
        if row % block == 0:
            return wanted
        wanted = _FALLBACK.get(wanted, T.F16)
    return wanted


def stored_shape(shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> tuple[int, ...]:
    """The numpy shape `encode` returns (bytes per row for block types)."""
    if qtype in (T.F16, T.F32):
        return shape
    return tuple(gguf.quant_shape_to_byte_shape(shape, qtype))


def stored_nbytes(shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> int:
    size = 1
    for dim in stored_shape(shape, qtype):
        size *= dim
    if qtype == T.F32:
        return size * 4
    if qtype == T.F16:
        return size * 2
    return size


def encode(values: NDArray[np.float32], qtype: gguf.GGMLQuantizationType) -> NDArray[np.generic]:
    """fp32 `values` stored as `qtype`: float16/float32 arrays, or uint8 block bytes."""
    if qtype == T.F32:
        return np.ascontiguousarray(values, dtype=np.float32)
    if qtype == T.F16:
        return np.ascontiguousarray(values, dtype=np.float16)
    rows = values.reshape(-1, values.shape[-1])
    if qtype == T.Q4_K:
        encoded = quantize_q4_k(rows)
    elif qtype == T.Q6_K:
        encoded = quantize_q6_k(rows)
    else:
        encoded = gguf.quants.quantize(rows, qtype)
    return encoded.reshape(stored_shape(values.shape, qtype))


__all__ = [
    "FILE_TYPES",
    "GGUF_QUANTIZATIONS",
    "GgufQuantization",
    "encode",
    "stored_nbytes",
    "stored_shape",
    "tensor_type",
    "use_more_bits",
]
