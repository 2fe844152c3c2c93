"""The MoRA operator and its weight change, in torch: the one place MoRA's math is written.

See `peftreg.adapters.mora` for the reference (peft-mora) and the shapes. Merge (jobs
and `peftreg merge`) and merged hot-swap reach it through `peftreg.adapters.factors`.
"""

from __future__ import annotations

import math

import torch

from peftreg.adapters.mora import check_operator

ROPE_BASE = 10000.0


def _rope_tables(side: int, chunks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, (chunks, side) fp32, of RoPE at positions 0..chunks-1 (rotate-half)."""
    inv_freq = 1.0 / (ROPE_BASE ** (torch.arange(0, side, 2).float() / side))
    freqs = torch.outer(torch.arange(chunks).float(), inv_freq)
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos(), angles.sin()


def apply_mora(
    x: torch.Tensor, square: torch.Tensor, out_features: int, mora_type: int
) -> torch.Tensor:
    """The MoRA operator on x (..., in) -> (..., out), in x's dtype (fp32 for merges)."""
    side = int(square.shape[0])
    in_features = int(x.shape[-1])
    check_operator(side, in_features, out_features, mora_type)
    pad = (-in_features) % side
    if pad:
        x = torch.cat([x, x[..., :pad]], dim=-1)
    chunks = x.shape[-1] // side
    blocks = x.reshape(*x.shape[:-1], chunks, side)
    if mora_type == 1:
        mapped = blocks.sum(dim=-2) @ square.T  # (..., side)
    else:
        cos, sin = _rope_tables(side, chunks)
        half = side // 2
        rotated = torch.cat((-blocks[..., half:], blocks[..., :half]), dim=-1)
        turned = blocks * cos.to(x.dtype) + rotated * sin.to(x.dtype)
        mapped = (turned @ square.T).reshape(*x.shape[:-1], chunks * side)
    width = mapped.shape[-1]
    if width < out_features:
        mapped = torch.cat([mapped] * math.ceil(out_features / width), dim=-1)
    return mapped[..., :out_features]


def mora_delta(
    square: torch.Tensor,
    in_features: int,
    out_features: int,
    mora_type: int,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """The weight change (out, in), fp32 on `device`: the operator applied to the identity."""
    identity = torch.eye(in_features, dtype=torch.float32, device=device)
    mapped = apply_mora(identity, square.to(device, torch.float32), out_features, mora_type)
    return mapped.T.contiguous()


__all__ = ["apply_mora", "mora_delta"]
