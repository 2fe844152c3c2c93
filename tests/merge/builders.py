"""Shared builders of the merge tests: tiny bases on disk, peft adapters, peft's merge."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from peft import PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import PreTrainedModel

from peftreg.formats.safetensors_header import DTYPE_SIZES, read_header
from tests.adapters.tiny_models import same_weights

TOLERANCE = 1e-6


def save_base(model: PreTrainedModel, directory: Path) -> Path:
    model.save_pretrained(str(directory), safe_serialization=True)
    return directory


def perturb(model: torch.nn.Module, seed: int = 7) -> None:
    """Random non-zero adapter weights (peft initializes B, and DoRA's m, to no-ops)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name or "lora_embedding_A" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
            elif "lora_magnitude_vector" in name:
                param.mul_(1 + 0.1 * torch.randn(param.shape, generator=generator))
            elif "modules_to_save" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)


def save_adapter(base: PreTrainedModel, config: PeftConfig, directory: Path, seed: int = 7) -> Path:
    peft_model = get_peft_model(same_weights(base), config)
    perturb(peft_model, seed)
    peft_model.save_pretrained(str(directory), safe_serialization=True)
    return directory


def peft_merged(base: PreTrainedModel, adapter_dir: Path) -> PreTrainedModel:
    """peft's own merge: PeftModel.from_pretrained(...).merge_and_unload()."""
    loaded = PeftModel.from_pretrained(same_weights(base), str(adapter_dir))
    merged: PreTrainedModel = loaded.merge_and_unload()
    return merged.eval()


def directory_tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(str(shard)))
    return tensors


def max_difference(
    got: dict[str, torch.Tensor],
    want: dict[str, torch.Tensor],
    convert: Callable[[torch.Tensor], torch.Tensor] = lambda t: t.float(),
) -> float:
    """Largest |got - want| over every tensor of `got` (each must be in `want`)."""
    worst = 0.0
    for name, value in got.items():
        assert name in want, name
        expected = convert(want[name])
        assert tuple(value.shape) == tuple(expected.shape), name
        worst = max(worst, (convert(value) - expected).abs().max().item() if value.numel() else 0.0)
    return worst


def assert_aligned(directory: Path) -> None:
    """Every tensor of every shard starts at a multiple of its element size (file offset)."""
    shards = sorted(directory.glob("*.safetensors"))
    assert shards
    for shard in shards:
        with shard.open("rb") as stream:
            header = read_header(stream, shard.stat().st_size)
        assert header.data_start % 8 == 0, shard.name
        for entry in header.tensors.values():
            begin = header.data_start + entry.begin
            assert begin % DTYPE_SIZES[entry.dtype] == 0, (shard.name, entry.name, begin)
