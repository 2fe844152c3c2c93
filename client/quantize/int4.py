"""Symmetric group-wise INT4 weight quantization: round-to-nearest and an MSE scale search.

A weight (out, in) is cut into groups of `group_size` consecutive input
columns; each group g of row o has one scale s[o, g] and stores
q = clamp(round(w / s), -8, 7), decoded as q * s (no zero-point).

Scale conventions (the ones compressed-tensors 0.20 uses, so what is written
decodes exactly as it would from llm-compressor's minmax observer):

- `rtn`: s = absmax / 7.5, absmax the group's largest |w|
  (`calculate_qparams`: max(|min|, |max|) / ((q_max - q_min) / 2)).
- `mse`: a per-group clipping search. For each group it tries
  s = (absmax / 7.5) * f for every f in `MSE_SHRINK_FACTORS` (0.70 .. 1.00,
  then up to 7.5 / 7 so that a positive extreme can be represented exactly),
  keeps the one with the smallest squared reconstruction error of that group,
  then refines it by least squares for the chosen codes
  (s = <w, q> / <q, q>, re-quantized, kept only where the error drops).
  Data-free; f = 1 is the `rtn` scale itself, so no group is ever worse than
  round-to-nearest.

Scales are stored in the checkpoint's dtype (bf16, fp16 or fp32), so every
candidate scale is rounded to that dtype first and the codes are computed
against the rounded scale: what is stored is what was optimized. A scale that
rounds to zero becomes the dtype's epsilon, as in compressed-tensors.

All functions work on whole tensors on the tensor's device (CPU or CUDA); the
search runs over row chunks to bound temporary memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch

from peftreg.quantize.errors import InvalidGroupSize, UnknownAlgorithm, UnquantizableTensor
from peftreg.quantize.pack import INT4_MAX, INT4_MIN

Int4Algorithm = Literal["rtn", "mse"]
ALGORITHMS: tuple[str, ...] = get_args(Int4Algorithm)

HALF_RANGE = (INT4_MAX - INT4_MIN) / 2  # 7.5
MSE_SHRINK_FACTORS: tuple[float, ...] = (
    *(round(0.70 + 0.015 * step, 6) for step in range(21)),  # 0.70, 0.715, ..., 1.00
    1.015,
    1.03,
    1.045,
    1.06,
    HALF_RANGE / INT4_MAX,  # 7.5 / 7: the positive extreme becomes exactly 7 * s
)
MSE_REFINEMENT_STEPS = 2
# Weights per row chunk: 1 Mi (4 MiB fp32 per temporary) keeps a CPU's temporaries in cache;
# an accelerator wants large kernels, so 16 Mi there.
CPU_CHUNK_ELEMENTS = 1 << 20
ACCELERATOR_CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class ReconstructionError:
    """Squared error of a dequantized weight against the original, summable over tensors."""

    squared_error: float
    reference_energy: float
    elements: int

    @property
    def relative(self) -> float:
        """Relative Frobenius error ||w - dequantize(q, s)||_F / ||w||_F."""
        if self.reference_energy == 0.0:
            return 0.0 if self.squared_error == 0.0 else float("inf")
        return float((self.squared_error / self.reference_energy) ** 0.5)

    @property
    def mse(self) -> float:
        return self.squared_error / self.elements if self.elements else 0.0

    def __add__(self, other: ReconstructionError) -> ReconstructionError:
        return ReconstructionError(
            self.squared_error + other.squared_error,
            self.reference_energy + other.reference_energy,
            self.elements + other.elements,
        )


def validate_group_size(group_size: object) -> int:
    """The group size as an int, or `InvalidGroupSize` naming why it is refused.

    Any positive multiple of 8 (a group then fills whole int32 words) loads in
    transformers; vLLM's Marlin kernels take 32, 64 and 128.
    """
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise InvalidGroupSize(f"group size must be an integer, got {group_size!r}")
    if group_size <= 0 or group_size % 8 != 0:
        raise InvalidGroupSize(
            f"group size must be a positive multiple of 8 (e.g. 32, 64, 128), got {group_size}"
        )
    return group_size


def validate_algorithm(algorithm: object) -> Int4Algorithm:
    if algorithm == "rtn":
        return "rtn"
    if algorithm == "mse":
        return "mse"
    raise UnknownAlgorithm(
        f"unknown INT4 algorithm {algorithm!r}; expected one of {', '.join(ALGORITHMS)}"
    )


def quantize_groups(
    weight: torch.Tensor,
    group_size: int,
    algorithm: Int4Algorithm = "rtn",
    scale_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a 2-D weight (out, in) group-wise.

    Returns (q, scale): q int8 (out, in) in [-8, 7] and scale fp32
    (out, in // group_size) whose values are exactly representable in
    `scale_dtype`, on the weight's device.
    """
    group_size = validate_group_size(group_size)
    algorithm = validate_algorithm(algorithm)
    if weight.ndim != 2:
        raise UnquantizableTensor(f"INT4 quantizes 2-D weights, got shape {tuple(weight.shape)}")
    if not weight.dtype.is_floating_point:
        raise UnquantizableTensor(f"INT4 quantizes floating-point weights, got {weight.dtype}")
    if not scale_dtype.is_floating_point:
        raise UnquantizableTensor(f"scales must be floating point, got {scale_dtype}")
    rows, columns = weight.shape
    if columns % group_size:
        raise InvalidGroupSize(
            f"input dimension {columns} is not divisible by the group size {group_size}"
        )
    groups = weight.to(torch.float32).reshape(rows, columns // group_size, group_size)
    if groups.numel() == 0:
        empty_scale = torch.ones(groups.shape[:2], dtype=torch.float32, device=weight.device)
        return torch.zeros((rows, columns), dtype=torch.int8, device=weight.device), empty_scale
    search = _rtn_scale if algorithm == "rtn" else _mse_scale
    chunk_elements = (
        CPU_CHUNK_ELEMENTS if weight.device.type == "cpu" else ACCELERATOR_CHUNK_ELEMENTS
    )
    chunk_rows = max(1, chunk_elements // columns)
    codes: list[torch.Tensor] = []
    scales: list[torch.Tensor] = []
    for chunk in torch.split(groups, chunk_rows):
        absmax = chunk.abs().amax(dim=-1)
        if not bool(torch.isfinite(absmax).all()):
            raise UnquantizableTensor("the weight holds NaN or infinite values")
        scale = search(chunk, absmax, scale_dtype)
        codes.append(_codes(chunk, scale))
        scales.append(scale)
    return torch.cat(codes).reshape(rows, columns), torch.cat(scales)


def dequantize(q: torch.Tensor, scale: torch.Tensor, group_size: int) -> torch.Tensor:
    """q (out, in) and scale (out, in // group_size) -> fp32 weight q * s (exact in fp32)."""
    rows, columns = q.shape
    groups = q.to(torch.float32).reshape(rows, columns // group_size, group_size)
    return (groups * scale.to(torch.float32).unsqueeze(-1)).reshape(rows, columns)


def reconstruction_error(
    weight: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, group_size: int
) -> ReconstructionError:
    """How far `dequantize(q, scale)` is from `weight`, as summable squared-error totals."""
    reference = weight.to(torch.float64)
    difference = reference - dequantize(q, scale, group_size).to(torch.float64)
    return ReconstructionError(
        squared_error=float(difference.square().sum()),
        reference_energy=float(reference.square().sum()),
        elements=weight.numel(),
    )


def _representable(scale: torch.Tensor, scale_dtype: torch.dtype) -> torch.Tensor:
    """Round scales to the stored dtype (back in fp32); zeros become the dtype's epsilon."""
    rounded = scale.to(scale_dtype).to(torch.float32)
    return torch.where(rounded == 0, torch.finfo(scale_dtype).eps, rounded)


def _rtn_scale(
    groups: torch.Tensor, absmax: torch.Tensor, scale_dtype: torch.dtype
) -> torch.Tensor:
    scale = _representable(absmax / HALF_RANGE, scale_dtype)
    if not bool(torch.isfinite(scale).all()):
        raise UnquantizableTensor(f"a group scale overflows {scale_dtype}")
    return scale


def _codes(groups: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Group codes q = clamp(round(w / s), -8, 7) as int8."""
    return _float_codes(groups, scale).to(torch.int8)


def _float_codes(groups: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (groups / scale.unsqueeze(-1)).clamp_(INT4_MIN, INT4_MAX).round_()


def _group_error(groups: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Per group, the squared error of quantizing with `scale` (one temporary, in place)."""
    decoded = _float_codes(groups, scale).mul_(scale.unsqueeze(-1))
    return decoded.sub_(groups).square_().sum(dim=-1)


def _mse_scale(
    groups: torch.Tensor, absmax: torch.Tensor, scale_dtype: torch.dtype
) -> torch.Tensor:
    """Per group, the searched scale with the smallest squared reconstruction error.

    f = 1 (the `rtn` scale) is the starting point and a candidate only wins
    where it is strictly better. A scale that overflows `scale_dtype` quantizes
    its group to zeros, which never beats round-to-nearest, so it is never kept.
    """
    base = absmax / HALF_RANGE
    best_scale = _rtn_scale(groups, absmax, scale_dtype)
    best_error = _group_error(groups, best_scale)
    candidates = [base * factor for factor in MSE_SHRINK_FACTORS if factor != 1.0]
    for step in range(len(candidates) + MSE_REFINEMENT_STEPS):
        if step < len(candidates):
            scale = _representable(candidates[step], scale_dtype)
        else:  # least squares for the current codes: s = <w, q> / <q, q>
            codes = _float_codes(groups, best_scale)
            energy = codes.square().sum(dim=-1)
            fitted = (groups * codes).sum(dim=-1) / energy.clamp_min(1.0)
            scale = _representable(torch.where(energy > 0, fitted, best_scale), scale_dtype)
        error = _group_error(groups, scale)
        better = error < best_error
        best_scale = torch.where(better, scale, best_scale)
        best_error = torch.where(better, error, best_error)
    return best_scale
