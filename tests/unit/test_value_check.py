"""The finite-value check reads tensors in bounded pieces and still sees every value."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from peftreg.adapters.validate import AdapterInvalid, _check_values, values_from_bytes
from peftreg.formats.safetensors_header import read_header


def pieces_of(path: Path, piece_bytes: int) -> tuple[object, list[int]]:
    size = path.stat().st_size
    with path.open("rb") as stream:
        header = read_header(stream, size)
    raw = path.read_bytes()
    served: list[int] = []

    def read_values(name: str) -> Iterator[torch.Tensor]:
        start, end = header.absolute_range(name)
        for offset in range(start, end, piece_bytes):
            chunk = raw[offset : min(end, offset + piece_bytes)]
            served.append(len(chunk))
            yield values_from_bytes(chunk, header.tensors[name])

    return (header, read_values), served


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_bad_value_in_the_last_piece_is_found(tmp_path: Path, value: float) -> None:
    tensor = torch.zeros(1000)
    tensor[-1] = value
    path = tmp_path / "a.safetensors"
    save_file({"base_model.model.x.lora_A.weight": tensor}, str(path))
    (header, read_values), served = pieces_of(path, piece_bytes=400)
    with pytest.raises(AdapterInvalid, match="NaN" if value != value else "Inf"):
        _check_values(header, read_values)  # type: ignore[arg-type]
    assert max(served) <= 400
    assert len(served) == 10


def test_finite_values_pass(tmp_path: Path) -> None:
    path = tmp_path / "ok.safetensors"
    save_file({"w": torch.randn(33, 7)}, str(path))
    (header, read_values), _ = pieces_of(path, piece_bytes=64)
    _check_values(header, read_values)  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_values_are_read_exactly_in_every_weight_dtype(tmp_path: Path, dtype: torch.dtype) -> None:
    """numpy reads what torch wrote, bf16 widened bit for bit, non-finite values kept."""
    tensor = torch.tensor([1.5, -2.25, 3.0e-3, float("nan"), float("inf"), -65504.0], dtype=dtype)
    path = tmp_path / "t.safetensors"
    save_file({"t": tensor}, str(path))
    (_, read_values), _ = pieces_of(path, piece_bytes=1 << 20)
    (values,) = list(read_values("t"))  # type: ignore[operator]
    want = tensor.float().numpy()
    assert values.tolist()[:3] == want.tolist()[:3]
    assert values[3] != values[3]  # NaN
    assert values[4] == float("inf")
    assert values[5] == want[5]
