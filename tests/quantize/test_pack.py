"""int4 packing agrees bit for bit with compressed-tensors' own pack/unpack."""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import (
    pack_to_int32,
    unpack_from_int32,
)

from peftreg.quantize import pack, pack_int4, unpack_int4


def random_codes(rows: int, columns: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(-8, 8, (rows, columns), generator=generator, dtype=torch.int8)


@pytest.mark.parametrize("columns", [1, 7, 8, 13, 64, 130, 1000])
def test_pack_matches_compressed_tensors_bit_for_bit(columns: int) -> None:
    codes = random_codes(9, columns, seed=columns)
    ours = pack_int4(codes)
    theirs = pack_to_int32(codes, 4)
    assert ours.dtype == torch.int32
    assert ours.shape == (9, -(-columns // 8))
    assert torch.equal(ours, theirs)
    assert torch.equal(unpack_int4(ours, columns), codes)
    assert torch.equal(unpack_from_int32(ours, 4, torch.Size((9, columns))), codes)
    assert torch.equal(unpack_int4(theirs, columns), codes)


def test_first_element_in_low_nibble_and_offset_by_eight() -> None:
    codes = torch.tensor([[-8, -7, 0, 1, 2, 3, 4, 7]], dtype=torch.int8)
    word = int(pack_int4(codes)[0, 0]) & 0xFFFFFFFF
    assert [(word >> (4 * index)) & 0xF for index in range(8)] == [0, 1, 8, 9, 10, 11, 12, 15]


def test_pack_refuses_out_of_range_and_float_values() -> None:
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4(torch.tensor([[8]], dtype=torch.int8))
    with pytest.raises(ValueError, match="integer"):
        pack_int4(torch.zeros(2, 8))
    with pytest.raises(ValueError, match="cannot hold"):
        unpack_int4(torch.zeros(2, 2, dtype=torch.int32), 24)


@pytest.mark.parametrize("columns", [0, 5, 16, 130])
def test_packing_in_row_blocks_is_bit_exact(columns: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of 40 values: one row at a time for wide rows, several for narrow ones, and a
    short last block."""
    monkeypatch.setattr(pack, "PACK_CHUNK_ELEMENTS", 40)
    codes = random_codes(11, columns, seed=columns + 1)
    ours = pack_int4(codes)
    assert ours.shape == (11, -(-columns // 8))
    assert torch.equal(ours, pack_to_int32(codes, 4))
    assert torch.equal(unpack_int4(ours, columns), codes)
    wide = random_codes(3, 8, seed=2).to(torch.int64)  # any integer dtype
    assert torch.equal(pack_int4(wide), pack_to_int32(wide.to(torch.int8), 4))
