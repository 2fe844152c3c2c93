"""The streaming checkpoint writer: planned headers, checked data, shards, index, staging."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from peftreg.checkpoint.encoding import PlannedTensor
from peftreg.checkpoint.writer import (
    INDEX_FILE,
    SAFETENSORS_DTYPES,
    CheckpointWriteError,
    CheckpointWriter,
    StagedDirectory,
    plan_shards,
    shard_file_name,
    write_durably,
)
from peftreg.formats.safetensors_header import DTYPE_SIZES, read_header
from peftreg.merge.model_dir import write_model_files
from peftreg.sdk.errors import Conflict
from tests.merge.builders import assert_aligned


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
    # Laid out by decreasing element size, plan order among equal sizes (as safetensors does).
    assert list(header.tensors) == ["c.ids", "d.scale", "f.empty", "a.weight", "b.bias", "e.mask"]
    assert_aligned(tmp_path)
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


def test_every_tensor_starts_at_a_multiple_of_its_element_size(tmp_path: Path) -> None:
    """Odd element counts in mixed dtypes, in an order that would misalign them if laid out
    in plan order (INT4 writes bf16 scales between int32 and int64 tensors)."""
    g = torch.Generator().manual_seed(1)
    tensors = {
        "x.weight_packed": torch.randint(0, 100, (3, 3), generator=g, dtype=torch.int32),
        "x.weight_scale": torch.randn(3, 1, generator=g).to(torch.bfloat16),
        "x.weight_shape": torch.tensor([3, 24]),
        "mask": torch.tensor([True, False, True]),
        "norm.weight": torch.randn(5, generator=g),
        "y.weight_shape": torch.tensor([5, 8]),
        "half": torch.randn(7, generator=g).to(torch.float16),
        "double": torch.randn(3, generator=g, dtype=torch.float64),
    }
    shards = _write(tmp_path, tensors, max_shard_bytes=60)
    assert len(shards) > 1
    assert_aligned(tmp_path)
    loaded: dict[str, torch.Tensor] = {}
    for shard in shards:
        loaded.update(load_file(str(tmp_path / shard)))  # safetensors checks contiguity
    assert loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[name], value) for name, value in tensors.items())


def test_the_dtype_table_agrees_with_the_header_parser() -> None:
    assert SAFETENSORS_DTYPES.keys() == DTYPE_SIZES.keys()
    for name, dtype in SAFETENSORS_DTYPES.items():
        assert dtype.itemsize == DTYPE_SIZES[name], name


def _fsync_recorder(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every path os.fsync is called on, in order (the real fsync still runs)."""
    synced: list[Path] = []
    real_fsync = os.fsync

    def recording_fsync(descriptor: int) -> None:
        synced.append(Path(os.readlink(f"/proc/self/fd/{descriptor}")))
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    return synced


def test_files_and_directories_are_fsynced_before_and_after_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = tmp_path / "base"
    base.mkdir()
    (base / "tokenizer.json").write_text('{"version": "1.0"}')
    tensors = {f"layer.{i}.weight": torch.full((10, 10), float(i)) for i in range(3)}
    tmp_path = tmp_path.resolve()  # as /proc/self/fd names it
    output = tmp_path / "new" / "out"
    synced = _fsync_recorder(monkeypatch)
    with StagedDirectory(output) as staging:
        _write(staging.path, tensors, max_shard_bytes=500)
        write_model_files(base, staging.path, {"model_type": "llama"})
        staging.commit()
    staged = {path.name for path in synced if path.parent.name.startswith(".out.peftreg-")}
    written = {path.name for path in output.iterdir()}
    assert written == {
        "config.json",
        "tokenizer.json",
        INDEX_FILE,
        *(shard_file_name(i, 3) for i in range(3)),
    }
    assert staged == written  # every file, while still in the staging directory
    staging_dir = next(p for p in synced if p.name.startswith(".out.peftreg-"))
    # The new parent's entry, the staging directory, then (after the rename) the parent.
    assert synced.index(tmp_path) < synced.index(staging_dir)
    assert synced[-1] == output.parent
    assert synced.index(staging_dir) < len(synced) - 1


def test_a_failed_replace_puts_the_old_output_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    output = tmp_path / "out"
    output.mkdir()
    (output / "old.json").write_text("old")

    def no_space(_source: object, _target: object) -> None:
        raise OSError(28, "No space left on device")

    with StagedDirectory(output, replace=True) as staging:
        write_durably(staging.path / "new.json", b"new")
        monkeypatch.setattr(os, "replace", no_space)
        with pytest.raises(OSError, match="No space left"):
            staging.commit()
        monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging, nothing aside
    assert (output / "old.json").read_text() == "old"


def test_an_old_output_that_cannot_be_put_back_is_kept_not_deleted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    output = tmp_path / "out"
    output.mkdir()
    (output / "old.json").write_text("old")
    real_rename: Callable[[str | Path, str | Path], None] = os.rename
    renames: list[tuple[Path, Path]] = []

    def failing(source: str | Path, target: str | Path) -> None:
        renames.append((Path(source), Path(target)))
        if len(renames) == 1:
            real_rename(source, target)  # the old output moved aside
            return
        # The new one fails to land, and the old one cannot be put back.
        raise OSError(5, "Input/output error")

    with StagedDirectory(output, replace=True) as staging:
        write_durably(staging.path / "new.json", b"new")
        monkeypatch.setattr(os, "rename", failing)
        monkeypatch.setattr(os, "replace", failing)
        with pytest.raises(CheckpointWriteError, match="kept at") as caught:
            staging.commit()
        monkeypatch.undo()
    retired = renames[0][1]
    assert retired.name.startswith(".out.peftreg-old-")
    assert str(retired) in str(caught.value)
    assert (retired / "old.json").read_text() == "old"  # never deleted


def test_replacing_a_symlinked_output_leaves_its_target_alone(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "old.json").write_text("old")
    output = tmp_path / "out"
    output.symlink_to(target)
    with StagedDirectory(output, replace=True) as staging:
        write_durably(staging.path / "new.json", b"new")
        staging.commit()
    assert not output.is_symlink()
    assert [p.name for p in output.iterdir()] == ["new.json"]
    assert (target / "old.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "out"]
