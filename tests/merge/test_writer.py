"""The streaming checkpoint writer: planned headers, checked data, shards, index, staging."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from client.checkpoint.encoding import PlannedTensor
from client.checkpoint.writer import (
    INDEX_FILE,
    CheckpointWriteError,
    CheckpointWriter,
    StagedDirectory,
    plan_shards,
    shard_file_name,
)
from client.formats.safetensors_header import read_header
from client.sdk.errors import Conflict


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "b.bias": torch.randn(7, generator=g).to(torch.float16),
        "c.ids": torch.arange(11, dtype=torch.int64),
        "d.scale": torch.tensor(2.5),  # 0-d
        "e.mask": torch.tensor([True, False, True]),
        "f.empty": torch.zeros(0, 4),
    }


def _plan(tensors: dict[str, torch.Tensor]) -> list[PlannedTensor]:
    return [PlannedTensor(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]


def _write(directory: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> list[str]:
    with CheckpointWriter(directory, _plan(tensors), max_shard_bytes=max_shard_bytes) as writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor)
        return writer.finish()


def test_single_shard_is_a_valid_safetensors_file(tmp_path: Path) -> None:
    tensors = _tensors()
    assert _write(tmp_path, tensors, 10**9) == ["model.safetensors"]
    path = tmp_path / "model.safetensors"
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    assert length % 8 == 0  # padded with spaces like the safetensors library
    assert raw[8 : 8 + length].rstrip(b" ") == raw[8 : 8 + length].strip()
    with path.open("rb") as stream:
        header = read_header(stream, path.stat().st_size)  # the strict parser accepts it
    assert header.metadata == {"format": "pt"}
    assert list(header.tensors) == list(tensors)  # plan order
    loaded = load_file(str(path))
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype
        assert torch.equal(loaded[name], tensor), name
    with safe_open(str(path), "pt") as handle:
        assert handle.metadata() == {"format": "pt"}
    assert not (tmp_path / INDEX_FILE).exists()


def test_shards_follow_the_size_limit_and_get_an_index(tmp_path: Path) -> None:
    big = {f"layer.{i}.weight": torch.full((10, 10), float(i)) for i in range(5)}  # 400 B each
    big["huge"] = torch.ones(300)  # 1200 B: larger than the limit, a shard of its own
    big["tail"] = torch.ones(2)
    shards = _write(tmp_path, big, max_shard_bytes=900)
    assert shards == [shard_file_name(i, 5) for i in range(5)]
    assert shards[0] == "model-00001-of-00005.safetensors"
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in big.values())
    assert index["weight_map"] == {
        "layer.0.weight": shards[0],
        "layer.1.weight": shards[0],
        "layer.2.weight": shards[1],
        "layer.3.weight": shards[1],
        "layer.4.weight": shards[2],
        "huge": shards[3],
        "tail": shards[4],  # nothing joins a shard already past the limit
    }
    for shard in shards:
        for name, value in load_file(str(tmp_path / shard)).items():
            assert index["weight_map"][name] == shard
            assert torch.equal(value, big[name])


def test_raw_chunks_are_counted(tmp_path: Path) -> None:
    value = torch.arange(16, dtype=torch.int32)
    data = value.numpy().tobytes()
    plan = [PlannedTensor("x", torch.int32, (16,))]
    with CheckpointWriter(tmp_path, plan) as writer:
        writer.write_raw("x", [data[:10], data[10:]])
        writer.finish()
    assert torch.equal(load_file(str(tmp_path / "model.safetensors"))["x"], value)
    with CheckpointWriter(tmp_path / "short", plan) as writer:
        (tmp_path / "short").mkdir()
        with pytest.raises(CheckpointWriteError, match="60 bytes given, 64 planned"):
            writer.write_raw("x", [data[:60]])
    (tmp_path / "long").mkdir()
    with (
        CheckpointWriter(tmp_path / "long", plan) as writer,
        pytest.raises(CheckpointWriteError, match="more than the planned 64 bytes"),
    ):
        writer.write_raw("x", [data, b"1234"])


def test_data_that_differs_from_the_plan_is_refused(tmp_path: Path) -> None:
    plan = [PlannedTensor("a", torch.float16, (2, 3)), PlannedTensor("b", torch.float32, (4,))]
    with CheckpointWriter(tmp_path, plan) as writer:
        with pytest.raises(CheckpointWriteError, match="expected tensor a next, given b"):
            writer.write("b", torch.zeros(4))
        with pytest.raises(CheckpointWriteError, match=r"planned as torch\.float16"):
            writer.write("a", torch.zeros(2, 3))
        with pytest.raises(CheckpointWriteError, match=r"planned with shape \[2, 3\]"):
            writer.write("a", torch.zeros(3, 2, dtype=torch.float16))
        writer.write("a", torch.zeros(2, 3, dtype=torch.float16))
        with pytest.raises(CheckpointWriteError, match="1 planned tensors were never written"):
            writer.finish()
    with pytest.raises(CheckpointWriteError, match="planned twice"):
        plan_shards([plan[0], plan[0]])
    with pytest.raises(CheckpointWriteError, match="must be positive"):
        plan_shards(plan, 0)


def test_staged_directory_appears_only_on_commit(tmp_path: Path) -> None:
    output = tmp_path / "out"

    def fail_midway() -> None:
        with StagedDirectory(output) as staging:
            (staging.path / "config.json").write_text("{}")
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fail_midway()
    assert not output.exists()
    assert list(tmp_path.iterdir()) == []  # the staging directory is gone too
    with StagedDirectory(output) as staging:
        (staging.path / "config.json").write_text("{}")
        assert not output.exists()
        staging.commit()
    assert (output / "config.json").read_text() == "{}"
    with pytest.raises(Conflict, match="not empty; pass --force"):
        StagedDirectory(output)
    with StagedDirectory(output, replace=True) as staging:
        (staging.path / "new.json").write_text("[]")
        staging.commit()
    assert sorted(p.name for p in output.iterdir()) == ["new.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(Conflict, match="not a directory"):
        StagedDirectory(tmp_path / "file")
