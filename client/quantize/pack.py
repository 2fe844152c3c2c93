"""Pack signed int4 values into int32 words exactly as compressed-tensors does.

Layout (compressed-tensors `pack_to_int32(value, num_bits=4, packed_dim=1)`):
each value q in [-8, 7] is stored as the nibble q + 8; element i of a row goes
to word i // 8 at bit 4 * (i % 8), so the first element sits in the low
nibble. A row whose length is not a multiple of 8 is padded with zero nibbles.
Read as bytes (little-endian), byte j of a row holds element 2j in its low
nibble and element 2j + 1 in its high nibble, which is how both functions
below work, on whatever device the tensor is on. `pack_int4` writes into its
int32 result in blocks of rows (`PACK_CHUNK_ELEMENTS` values), so its
temporaries stay block-sized whatever the tensor's size.
"""

from __future__ import annotations

import sys

import torch

INT4_MIN = -8
INT4_MAX = 7
INT4_OFFSET = 8
VALUES_PER_WORD = 8
PACK_CHUNK_ELEMENTS = 1 << 20


def packed_columns(columns: int) -> int:
    """Number of int32 words that hold one row of `columns` int4 values."""
    return -(-columns // VALUES_PER_WORD)


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """(rows, columns) integers in [-8, 7] -> (rows, ceil(columns / 8)) int32 words."""
    if values.ndim != 2:
        raise ValueError(f"pack_int4 takes a 2-D tensor, got shape {tuple(values.shape)}")
    if values.dtype.is_floating_point or values.dtype.is_complex or values.dtype == torch.bool:
        raise ValueError(f"pack_int4 takes integer values, got {values.dtype}")
    if values.numel():
        low, high = torch.aminmax(values)
        if int(low) < INT4_MIN or int(high) > INT4_MAX:
            raise ValueError(f"int4 values must lie in [-8, 7], got [{int(low)}, {int(high)}]")
    rows, columns = values.shape
    words = packed_columns(columns)
    packed = torch.empty((rows, words), dtype=torch.int32, device=values.device)
    packed_bytes = packed.view(torch.uint8)  # (rows, words * 4)
    step = max(1, PACK_CHUNK_ELEMENTS // max(1, columns))
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        packed_bytes[start:stop] = _packed_row_bytes(values[start:stop], words)
    return packed


def _packed_row_bytes(values: torch.Tensor, words: int) -> torch.Tensor:
    """(rows, columns) values in [-8, 7] -> (rows, words * 4) bytes of the packed words."""
    rows, columns = values.shape
    nibbles = (values.to(torch.int16) + INT4_OFFSET).to(torch.uint8)
    padding = words * VALUES_PER_WORD - columns
    if padding:
        nibbles = torch.nn.functional.pad(nibbles, (0, padding))
    pairs = nibbles.view(rows, words * 4, 2)
    packed_bytes = pairs[..., 0] | (pairs[..., 1] << 4)
    if sys.byteorder == "big" and packed_bytes.device.type == "cpu":
        packed_bytes = packed_bytes.view(rows, words, 4).flip(-1).reshape(rows, words * 4)
    return packed_bytes


def unpack_int4(packed: torch.Tensor, columns: int) -> torch.Tensor:
    """(rows, words) int32 -> (rows, columns) int8 values in [-8, 7]; inverse of `pack_int4`."""
    if packed.ndim != 2 or packed.dtype != torch.int32:
        raise ValueError(
            f"unpack_int4 takes a 2-D int32 tensor, got {packed.dtype} {tuple(packed.shape)}"
        )
    rows, words = packed.shape
    if packed_columns(columns) != words:
        raise ValueError(f"{words} int32 words per row cannot hold exactly {columns} int4 values")
    packed_bytes = packed.contiguous().view(torch.uint8)
    if sys.byteorder == "big" and packed_bytes.device.type == "cpu":
        packed_bytes = packed_bytes.view(rows, words, 4).flip(-1)
    packed_bytes = packed_bytes.reshape(rows, words * 4)
    nibbles = torch.stack((packed_bytes & 0xF, packed_bytes >> 4), dim=-1).reshape(rows, -1)
    return (nibbles[:, :columns].to(torch.int8) - INT4_OFFSET).contiguous()
