"""NF4 quantize -> dequantize round trip, as bitsandbytes does it for QLoRA bases.

A QLoRA adapter was trained against the NF4-dequantized weights, not the
original ones, so a faithful merge adds its delta to those. bitsandbytes
(`quantize_4bit(quant_type="nf4", blocksize=64)` and its dequantize kernels):

- the weight, flattened row-major, is cut into blocks of 64 values; each block
  keeps its absmax in fp32;
- each value is scaled by the fp32 reciprocal of its block's absmax and
  mapped to one of 16 codes by the decision tree of `dQuantizeNF4` (strict
  `>` against the pivots below, the midpoints between neighbouring codes);
- dequantization is `NF4_CODE[code] * absmax` in fp32, rounded to the dtype
  the weight had when it was quantized.

Two codes share a byte, the first value in the high nibble; that packing does
not change a round trip, so it is not reproduced here. Double quantization
(`bnb_4bit_use_double_quant`: absmax itself 8-bit quantized in blocks of
256) is NOT modelled: the round trip assumes fp32 absmax, so an adapter
trained with double quantization sees weights that differ by the absmax
rounding.

Transformers quantizes the weights of `nn.Linear` and GPT-2 `Conv1D` layers
(a Conv1D weight transposed to (out, in) first), not embeddings or `lm_head`.
"""

from __future__ import annotations

import torch

BLOCK_SIZE = 64

# bitsandbytes' NF4 code book (functional.py `get_4bit_type("nf4")`, kernels' `dDequantizeNF4`).
NF4_CODE = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
# The pivots of `dQuantizeNF4`'s decision tree: code = how many of them x is strictly above.
NF4_PIVOTS = (
    -0.8480964004993439,
    -0.6106329262256622,
    -0.4599952697753906,
    -0.33967943489551544,
    -0.23460740596055984,
    -0.13791173323988914,
    -0.045525018125772476,
    0.03979014977812767,
    0.1202552504837513,
    0.2035212516784668,
    0.2920137718319893,
    0.3893125355243683,
    0.5016634166240692,
    0.6427869200706482,
    0.8614784181118011,
)


def nf4_quantize(
    weight: torch.Tensor, block_size: int = BLOCK_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, absmax): one code 0..15 (uint8) per value of the flattened weight, and the
    fp32 absmax of each block (the last block zero-padded)."""
    flat = weight.detach().reshape(-1).to(torch.float32)
    count = flat.numel()
    padded = -count % block_size
    if padded:
        flat = torch.cat([flat, flat.new_zeros(padded)])
    blocks = flat.view(-1, block_size)
    absmax = blocks.abs().amax(dim=1)
    inverse = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
    scaled = blocks * inverse[:, None]
    pivots = torch.tensor(NF4_PIVOTS, dtype=torch.float32, device=flat.device)
    codes = torch.bucketize(scaled, pivots, out_int32=True, right=False)
    return codes.reshape(-1)[:count].to(torch.uint8), absmax


def nf4_dequantize(
    codes: torch.Tensor,
    absmax: torch.Tensor,
    shape: tuple[int, ...],
    dtype: torch.dtype = torch.float32,
    block_size: int = BLOCK_SIZE,
) -> torch.Tensor:
    """`NF4_CODE[code] * absmax` in fp32, rounded to `dtype`, in `shape`."""
    count = codes.numel()
    padded = -count % block_size
    table = torch.tensor(NF4_CODE, dtype=torch.float32, device=codes.device)
    values = table[codes.to(torch.int64)]
    if padded:
        values = torch.cat([values, values.new_zeros(padded)])
    values = values.view(-1, block_size).mul_(absmax[:, None])
    return values.reshape(-1)[:count].to(dtype).reshape(shape)


def nf4_round_trip(
    weight: torch.Tensor,
    *,
    dtype: torch.dtype | None = None,
    block_size: int = BLOCK_SIZE,
) -> torch.Tensor:
    """The weight bitsandbytes' NF4 gives back, as fp32 on the weight's device.

    `dtype` is the dtype the weight had when quantized (the dequantized values
    are rounded to it); the weight's own dtype by default.
    """
    codes, absmax = nf4_quantize(weight, block_size)
    restored = nf4_dequantize(codes, absmax, tuple(weight.shape), dtype or weight.dtype, block_size)
    return restored.to(torch.float32)


__all__ = [
    "BLOCK_SIZE",
    "NF4_CODE",
    "NF4_PIVOTS",
    "nf4_dequantize",
    "nf4_quantize",
    "nf4_round_trip",
]
