from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from peftreg.formats.fingerprint import fingerprint_directory
from peftreg.formats.safetensors_header import SafetensorsError


def model_tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        f"layers.{i}.{kind}.weight": torch.randn(16, 16, generator=generator)
        for i in range(3)
        for kind in ("q_proj", "v_proj")
    }


def write_shards(directory: Path, tensors: dict[str, torch.Tensor], shards: int) -> Path:
    directory.mkdir()
    names = sorted(tensors)
    for index in range(shards):
        part = {name: tensors[name] for name in names[index::shards]}
        save_file(part, str(directory / f"model-{index + 1:05d}-of-{shards:05d}.safetensors"))
    return directory


def test_fingerprint_does_not_depend_on_sharding(tmp_path: Path) -> None:
    tensors = model_tensors()
    one = fingerprint_directory(write_shards(tmp_path / "one", tensors, 1))
    three = fingerprint_directory(write_shards(tmp_path / "three", tensors, 3))
    assert one == three
    assert one.parameters == 6 * 16 * 16
    assert one.fingerprint.startswith("sha256:")


def test_one_changed_value_changes_the_fingerprint_not_the_structure(tmp_path: Path) -> None:
    tensors = model_tensors()
    original = fingerprint_directory(write_shards(tmp_path / "a", tensors, 2))
    tensors["layers.1.v_proj.weight"][3, 7] += 1e-3
    changed = fingerprint_directory(write_shards(tmp_path / "b", tensors, 2))
    assert changed.fingerprint != original.fingerprint
    assert changed.structure_hash == original.structure_hash


def test_a_dtype_change_changes_the_structure(tmp_path: Path) -> None:
    tensors = model_tensors()
    original = fingerprint_directory(write_shards(tmp_path / "a", tensors, 1))
    halved = {name: t.half() for name, t in tensors.items()}
    assert fingerprint_directory(write_shards(tmp_path / "b", halved, 1)).structure_hash != (
        original.structure_hash
    )


def test_a_tensor_in_two_shards_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "dup"
    directory.mkdir()
    tensor = {"w": torch.ones(2)}
    save_file(tensor, str(directory / "a.safetensors"))
    save_file(tensor, str(directory / "b.safetensors"))
    with pytest.raises(SafetensorsError, match="more than one shard"):
        fingerprint_directory(directory)
