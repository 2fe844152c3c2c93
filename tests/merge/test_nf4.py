"""NF4 round trip: bitsandbytes' code book, its decision-tree pivots, blocks of 64."""

from __future__ import annotations

import torch

from peftreg.merge.nf4 import NF4_CODE, NF4_PIVOTS, nf4_quantize, nf4_round_trip


def test_code_book_is_the_qlora_normal_float_construction() -> None:
    """bitsandbytes' create_normal_map(offset=0.9677083, use_extra_value=True): 8 positive
    and 7 negative normal quantiles (ppf of float32 linspaces), a zero, normalized by the max."""
    offset = 0.9677083
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9)[:-1].double())
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8)[:-1].double())
    values = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).float()
    values = values.sort().values
    values /= values.max()
    assert len(NF4_CODE) == 16
    assert (values - torch.tensor(NF4_CODE)).abs().max().item() < 1e-6
    assert NF4_CODE[0] == -1.0
    assert NF4_CODE[7] == 0.0
    assert NF4_CODE[15] == 1.0
    # The decision tree's pivots are the midpoints between neighbouring codes.
    midpoints = [(NF4_CODE[i] + NF4_CODE[i + 1]) / 2 for i in range(15)]
    assert max(abs(p - m) for p, m in zip(NF4_PIVOTS, midpoints, strict=True)) < 1e-7


def test_hand_computed_block() -> None:
    # One block of 4 with absmax 2: x / 2 = [1, -0.5, 0.1, 0, -0.02, 0.3, -1, 0.04] ...
    weight = torch.tensor([2.0, -1.0, 0.2, 0.0, -0.04, 0.6, -2.0, 0.08])
    codes, absmax = nf4_quantize(weight, block_size=8)
    # -0.5 lies between pivots -0.6106 and -0.4600 -> code 2 (-0.5251); 0.1 is above 0.0398
    # but not 0.1203 -> code 8 (0.0796); -0.02 is above -0.0455 -> code 7 (0); 0.3 is above
    # 0.2920 -> code 11 (0.3379); 0.04 is just above the 0.03979 pivot -> code 8.
    assert codes.tolist() == [15, 2, 8, 7, 7, 11, 0, 8]
    assert absmax.tolist() == [2.0]
    restored = nf4_round_trip(weight, block_size=8)
    expected = torch.tensor(
        [
            2.0,
            -0.5250730514526367 * 2,
            0.07958029955625534 * 2,
            0.0,
            0.0,
            0.33791524171829224 * 2,
            -2.0,
            0.07958029955625534 * 2,
        ]
    )
    assert torch.equal(restored, expected.float())


def test_blocks_of_64_partial_last_block_zero_block_and_dtype() -> None:
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(3, 50, generator=g)  # 150 values: blocks of 64, 64, 22
    weight[:, :] *= torch.linspace(0.1, 3.0, 50)
    weight[0, :] = 0.0
    weight[1, :14] = 0.0  # with row 0: the whole first block is zero
    codes, absmax = nf4_quantize(weight)
    assert codes.shape == (150,)
    assert codes.dtype == torch.uint8
    flat = weight.reshape(-1)
    assert absmax.tolist() == [flat[i : i + 64].abs().max().item() for i in (0, 64, 128)]
    restored = nf4_round_trip(weight)
    assert restored.shape == weight.shape
    assert restored.dtype == torch.float32
    assert torch.equal(restored.reshape(-1)[:64], torch.zeros(64))
    # Every restored value is a code value times its block's absmax, the nearest one.
    table = torch.tensor(NF4_CODE)
    for block, scale in enumerate(absmax.tolist()):
        if scale == 0:
            continue
        part = flat[block * 64 : (block + 1) * 64] / scale
        nearest = table[(part[:, None] - table[None, :]).abs().argmin(dim=1)] * scale
        assert torch.allclose(restored.reshape(-1)[block * 64 : (block + 1) * 64], nearest)
    # Each block's absmax survives exactly; the error is at most half the widest code gap.
    assert (restored - weight).abs().max().item() <= 0.5 * 0.3038 * absmax.max().item()
    # Dequantized values are rounded to the dtype the weight was quantized in.
    half = nf4_round_trip(weight.to(torch.float16))
    assert half.dtype == torch.float32
    assert torch.equal(half, half.to(torch.float16).float())
    assert torch.equal(half, nf4_round_trip(weight.to(torch.float16).float(), dtype=torch.float16))
    assert not torch.equal(half, nf4_round_trip(weight.to(torch.float16).float()))


def test_a_value_exactly_on_a_pivot_takes_the_lower_code() -> None:
    """bitsandbytes' dQuantizeNF4 tests `x > pivot` (fp32 constants), so a tie goes down."""
    pivots = torch.tensor(NF4_PIVOTS, dtype=torch.float32)
    # absmax 1 (the leading 1.0 and -1.0): each value is its own scaled value, exactly.
    weight = torch.cat([torch.tensor([1.0, -1.0]), pivots])
    codes, absmax = nf4_quantize(weight, block_size=weight.numel())
    assert absmax.tolist() == [1.0]
    assert codes[2:].tolist() == list(range(15))  # pivot i separates codes i and i + 1
    # One float32 step above a pivot goes up.
    above = torch.nextafter(pivots, torch.full_like(pivots, 2.0))
    codes, _ = nf4_quantize(torch.cat([torch.tensor([1.0, -1.0]), above]), block_size=17)
    assert codes[2:].tolist() == list(range(1, 16))
