"""The swap's loading and copy path: a file read once (header parsed once, tensors views of
one buffer, refused when it changed under the host), bounds computed in bulk equal to the
per-tensor ones, staging programs replayed across ranks, buffer sets and dtypes, and the
LRU's byte count."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from peftreg.hotswap import AdapterCache, AdapterHost, HostConfig, SwapError
from peftreg.hotswap.adapter import (
    adapter_from_local,
    directory_identity,
    inspect_directory,
    largest,
)
from peftreg.hotswap.tensorfile import largest_values, load_file_once, read_prefix
from tests.adapters.tiny_models import sample_ids, tiny_llama
from tests.hotswap.builders import (
    MAX_DIFF,
    TinyMLP,
    lora,
    mlp_input,
    model_outputs,
    peft_outputs,
    save_adapter,
)

TENSORS = "adapter_model.safetensors"


def test_a_directory_is_read_once_into_views_of_one_buffer(tmp_path: Path) -> None:
    path = save_adapter(tiny_llama, lora(["q_proj", "v_proj"]), tmp_path / "a")
    local = inspect_directory(path)
    assert local.header is not None
    raw = (path / TENSORS).read_bytes()
    assert local.header.raw == raw[: local.header.header.data_start]
    assert local.digest == directory_identity(local.config, local.tensors_path)
    adapter = adapter_from_local(local)
    storages = {
        t.untyped_storage().data_ptr() for f in adapter.factors.values() for t in (f.a, f.b)
    }
    assert len(storages) == 1  # one buffer, every factor a view of it
    ids = sample_ids()
    with AdapterHost(tiny_llama(), HostConfig(targets=["q_proj", "v_proj"])) as host:
        host.swap(adapter)
        outputs = model_outputs(host.model, ids)
        assert (outputs - peft_outputs(tiny_llama, path, ids)).abs().max() < MAX_DIFF
        assert (outputs - model_outputs(tiny_llama(), ids)).abs().max() > 100 * MAX_DIFF


def test_a_file_rewritten_after_its_header_was_read_is_refused(tmp_path: Path) -> None:
    path = save_adapter(tiny_llama, lora(["q_proj"], r=4), tmp_path / "a")
    local = inspect_directory(path)
    other = save_adapter(tiny_llama, lora(["q_proj"], r=2), tmp_path / "b")
    for name in (TENSORS, "adapter_config.json"):
        (path / name).write_bytes((other / name).read_bytes())
    with pytest.raises(SwapError, match="changed while it was loaded"):
        adapter_from_local(local)
    again = adapter_from_local(inspect_directory(path))  # inspected again: its new contents
    assert [f.rank for f in again.factors.values()] == [2, 2]


def test_a_file_rewritten_with_the_same_header_is_refused(tmp_path: Path) -> None:
    path = save_adapter(tiny_llama, lora(["q_proj"], r=4), tmp_path / "a", seed=1)
    local = inspect_directory(path)
    other = save_adapter(tiny_llama, lora(["q_proj"], r=4), tmp_path / "b", seed=2)
    data = (other / TENSORS).read_bytes()
    assert data[: len(local.header.raw)] == local.header.raw  # type: ignore[union-attr]
    (path / TENSORS).unlink()
    (path / TENSORS).write_bytes(data)  # another file (inode, time): the header alone agrees
    with pytest.raises(SwapError, match="changed while it was loaded"):
        adapter_from_local(local)


def test_bulk_bounds_equal_the_per_tensor_ones(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "a": torch.randn(3, 5, generator=generator),
        "b": -7.5 * torch.ones(4),  # the largest magnitude is negative
        "c": torch.tensor([1.0, float("inf")]),
        "d": torch.tensor([float("nan"), 2.0]),
        "e": torch.zeros(0),
        "f": torch.arange(6, dtype=torch.float16),  # another dtype: not covered in bulk
        "g": torch.randn(2, 2, generator=generator),
    }
    save_file(tensors, str(tmp_path / "t.safetensors"))
    loaded = load_file_once(read_prefix(tmp_path / "t.safetensors"))
    known = largest_values(loaded)
    for name, tensor in loaded.items():
        key = (tensor.data_ptr(), tensor.numel())
        if tensor.dtype != torch.float32 or not tensor.numel():
            assert key not in known
            continue
        expected, found = largest(tensor), known[key]
        assert (math.isnan(expected) and math.isnan(found)) or expected == found, name


def _adapters(tmp_path: Path) -> list[Path]:
    """Three adapters of different ranks and targets for a host of max_rank 4."""
    return [
        save_adapter(TinyMLP, lora(["fc1", "fc2"], r=4), tmp_path / "r4", seed=1),
        save_adapter(TinyMLP, lora(["fc2"], r=2), tmp_path / "r2", seed=2),
        save_adapter(TinyMLP, lora(["fc1", "fc2", "out"], r=3), tmp_path / "r3", seed=3),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_warm_swaps_across_ranks_and_buffer_sets_equal_a_fresh_host(
    tmp_path: Path, dtype: torch.dtype
) -> None:
    """Programs are kept per adapter and buffer set: every order of warm swaps (ranks up
    and down, targets gained and lost) computes what a host that swapped once does."""
    paths = _adapters(tmp_path)
    config = HostConfig(targets=["fc1", "fc2", "out"], max_rank=4, dtype=dtype)
    x = mlp_input()
    expected = []
    for path in paths:
        with AdapterHost(TinyMLP(), config) as fresh:
            fresh.swap(path)
            expected.append(model_outputs(fresh.model, x))
        if dtype == torch.float32:
            assert (expected[-1] - peft_outputs(TinyMLP, path, x)).abs().max() < MAX_DIFF
    with AdapterHost(TinyMLP(), config) as host:
        loaded = [host.load(path) for path in paths]
        for index in [0, 1, 2, 0, 2, 1, 1, 0, 1, 2, 2, 0]:
            event = host.swap(loaded[index])
            assert event.cached
            assert torch.equal(model_outputs(host.model, x), expected[index]), index
        host.unload()
        assert torch.equal(model_outputs(host.model, x), model_outputs(TinyMLP(), x))


def test_programs_are_dropped_with_their_adapters(tmp_path: Path) -> None:
    paths = [
        save_adapter(TinyMLP, lora(["fc1"], r=2), tmp_path / f"a{i}", seed=i) for i in range(5)
    ]
    config = HostConfig(targets=["fc1"], max_rank=2, cache_entries=2)
    with AdapterHost(TinyMLP(), config) as host:
        for path in paths:
            host.swap(path)
        kept = set(host.cache.digests()) | {host.active_digest}
        assert host._programs.digests() <= kept  # what the host holds on to


def test_the_cache_counts_each_entry_once(tmp_path: Path) -> None:
    paths = [
        save_adapter(TinyMLP, lora(["fc1"], r=2), tmp_path / f"a{i}", seed=i) for i in range(3)
    ]
    with AdapterHost(TinyMLP(), HostConfig(targets=["fc1"], max_rank=2)) as host:
        loaded = [host.load(path) for path in paths]
    size = loaded[0].nbytes
    cache = AdapterCache(max_entries=8, max_bytes=2 * size)
    for adapter in [loaded[0], loaded[0], loaded[1], loaded[1]]:
        cache.put(adapter)
    assert cache.nbytes == 2 * size
    assert len(cache) == 2
    cache.put(loaded[2])  # over the byte bound: the least recently used goes
    assert cache.digests() == [loaded[1].digest, loaded[2].digest]
    assert cache.nbytes == 2 * size
    cache.clear()
    assert cache.nbytes == 0
