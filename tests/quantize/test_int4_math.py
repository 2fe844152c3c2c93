"""Group-wise INT4 math: compressed-tensors' conventions, MSE search beats RTN, refusals."""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from compressed_tensors.quantization.lifecycle.forward import dequantize as ct_dequantize
from compressed_tensors.quantization.lifecycle.forward import quantize as ct_quantize
from compressed_tensors.quantization.utils import calculate_qparams

from peftreg.quantize import (
    InvalidGroupSize,
    ReconstructionError,
    UnknownAlgorithm,
    UnquantizableTensor,
    dequantize,
    pack_int4,
    quantize_groups,
    reconstruction_error,
)
from peftreg.sdk.errors import InvalidRequest
from tests.quantize.tiny_int4 import tiny_llama

SCALE_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def group_args(group_size: int) -> QuantizationArgs:
    return QuantizationArgs(
        num_bits=4, type="int", symmetric=True, strategy="group", group_size=group_size
    )


def weight(rows: int = 64, columns: int = 256, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, columns, generator=torch.Generator().manual_seed(seed)) * 0.02


@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES)
def test_rtn_is_compressed_tensors_minmax_quantization(scale_dtype: torch.dtype) -> None:
    w = weight()
    q, scale = quantize_groups(w, 64, "rtn", scale_dtype)
    args = group_args(64)
    groups = w.reshape(64, 4, 64)
    their_scale, _ = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
    assert torch.equal(scale, their_scale.to(scale_dtype).float())
    assert torch.equal(scale.to(scale_dtype).float(), scale)
    their_q = ct_quantize(x=w, scale=scale, zero_point=None, args=args, dtype=torch.int8)
    assert torch.equal(q, their_q)
    stored = scale.to(scale_dtype)
    their_w = ct_dequantize(x_q=q, scale=stored, zero_point=None, args=args)
    assert torch.equal(their_w, dequantize(q, scale, 64).to(scale_dtype))


@pytest.mark.parametrize("algorithm", ["rtn", "mse"])
def test_compressed_tensors_compressor_packs_and_decodes_our_codes(algorithm: str) -> None:
    w = weight(32, 128, seed=3)
    q, scale = quantize_groups(w, 32, algorithm, torch.bfloat16)  # type: ignore[arg-type]
    scheme = QuantizationScheme(targets=["Linear"], weights=group_args(32))
    compressed = PackedQuantizationCompressor.compress(
        {"weight": w, "weight_scale": scale.to(torch.bfloat16)}, scheme
    )
    assert torch.equal(compressed["weight_packed"], pack_int4(q))
    assert compressed["weight_shape"].tolist() == [32, 128]
    assert "weight_zero_point" not in compressed
    restored = PackedQuantizationCompressor.decompress(
        {
            "weight_packed": pack_int4(q),
            "weight_scale": scale.to(torch.bfloat16),
            "weight_shape": torch.tensor([32, 128]),
        },
        scheme,
    )
    assert torch.equal(restored["weight"], dequantize(q, scale, 32).to(torch.bfloat16))


@pytest.mark.parametrize("group_size", [32, 128])
def test_group_size_is_configurable(group_size: int) -> None:
    w = weight(16, 256)
    for algorithm in ("rtn", "mse"):
        q, scale = quantize_groups(w, group_size, algorithm, torch.bfloat16)  # type: ignore[arg-type]
        assert q.dtype == torch.int8
        assert q.shape == (16, 256)
        assert scale.shape == (16, 256 // group_size)
        assert int(q.min()) >= -8
        assert int(q.max()) <= 7
    # round-to-nearest: the scale is each group's own absmax / 7.5
    q, scale = quantize_groups(w, group_size, "rtn", torch.float32)
    largest = w.reshape(16, -1, group_size).abs().amax(-1)
    assert torch.equal(scale, largest / 7.5)


def test_zero_groups_get_epsilon_scale_and_zero_codes() -> None:
    w = torch.zeros(2, 64)
    w[1, :32] = torch.linspace(-1, 1, 32)
    q, scale = quantize_groups(w, 32, "mse", torch.float16)
    assert float(scale[0, 0]) == torch.finfo(torch.float16).eps
    assert int(q[0].abs().sum()) == 0
    assert int(q[1, 32:].abs().sum()) == 0


def heavy_tailed(rows: int, columns: int, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.distributions.StudentT(3.0).sample((rows, columns)) * 0.02


def trained_looking(rows: int, columns: int, seed: int) -> torch.Tensor:
    """Low-rank structure plus noise, with a few outlier input channels (as in trained LLMs)."""
    generator = torch.Generator().manual_seed(seed)
    low_rank = torch.randn(rows, 8, generator=generator) @ torch.randn(
        8, columns, generator=generator
    )
    w = 0.004 * low_rank + 0.02 * torch.randn(rows, columns, generator=generator)
    channel_scale = torch.exp(0.5 * torch.randn(columns, generator=generator))
    return w * channel_scale


def test_mse_search_has_lower_error_than_rtn_on_real_weights() -> None:
    model = tiny_llama(intermediate_size=256)
    tensors = {
        name: tensor
        for name, tensor in model.state_dict().items()
        if tensor.ndim == 2 and "embed" not in name
    }
    tensors["student_t_3"] = heavy_tailed(256, 512, seed=1)
    tensors["trained_looking"] = trained_looking(256, 512, seed=2)
    for scale_dtype in (torch.bfloat16, torch.float32):
        totals = {"rtn": ReconstructionError(0.0, 0.0, 0), "mse": ReconstructionError(0.0, 0.0, 0)}
        for name, w in tensors.items():
            errors = {}
            for algorithm in ("rtn", "mse"):
                q, scale = quantize_groups(w, 128, algorithm, scale_dtype)  # type: ignore[arg-type]
                errors[algorithm] = reconstruction_error(w, q, scale, 128)
                totals[algorithm] = totals[algorithm] + errors[algorithm]
            assert errors["mse"].relative < errors["rtn"].relative, (name, scale_dtype, errors)
            assert errors["mse"].mse < errors["rtn"].mse
        assert totals["mse"].relative < 0.97 * totals["rtn"].relative, totals


def test_reconstruction_error_is_relative_frobenius() -> None:
    w = torch.tensor([[3.0, 4.0]])
    q = torch.tensor([[3, 0]], dtype=torch.int8)
    error = reconstruction_error(w, q, torch.ones(1, 1), 2)
    assert error.squared_error == 16.0
    assert error.reference_energy == 25.0
    assert error.relative == pytest.approx(0.8)
    assert error.mse == 8.0


@pytest.mark.parametrize("group_size", [0, -1, 12, 100, True, 128.0, "128"])
def test_invalid_group_sizes_are_refused(group_size: object) -> None:
    with pytest.raises(InvalidGroupSize, match="group size") as caught:
        quantize_groups(weight(), group_size, "rtn")  # type: ignore[arg-type]
    assert isinstance(caught.value, InvalidRequest)


def test_group_size_must_divide_the_input_dimension() -> None:
    with pytest.raises(InvalidGroupSize, match="256 is not divisible by the group size 96"):
        quantize_groups(weight(), 96)


def test_unknown_algorithm_and_bad_tensors_are_refused() -> None:
    with pytest.raises(UnknownAlgorithm, match="'gptq'"):
        quantize_groups(weight(), 64, "gptq")  # type: ignore[arg-type]
    with pytest.raises(UnquantizableTensor, match="2-D"):
        quantize_groups(torch.zeros(64), 64)
    with pytest.raises(UnquantizableTensor, match="floating-point"):
        quantize_groups(torch.zeros(4, 64, dtype=torch.int32), 64)
    bad = weight()
    bad[0, 0] = float("nan")
    with pytest.raises(UnquantizableTensor, match="NaN"):
        quantize_groups(bad, 64)
    with pytest.raises(UnquantizableTensor, match="overflows"):
        quantize_groups(torch.full((1, 64), 1e6), 64, "rtn", torch.float16)
