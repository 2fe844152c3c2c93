"""The swap's loading and copy path: a directory's header parsed once (refused when the file
changed under the host), a pulled layer viewed in one buffer, the largest magnitudes,
staging programs replayed across ranks, buffer sets and dtypes, and the LRU's byte count."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from peftreg.hotswap import AdapterCache, AdapterHost, HostConfig, NonFiniteAdapter, SwapError
from peftreg.hotswap.adapter import (
    adapter_from_local,
    directory_identity,
    inspect_directory,
    largest,
    tensors_from_bytes,
)
from peftreg.hotswap.tensorfile import HUGE_PAGE, BufferPool
from tests.adapters.tiny_models import sample_ids, tiny_llama
from tests.hotswap.builders import (
    MAX_DIFF,
    TinyMLP,
    lora,
    mlp_input,
    model_outputs,
    peft_outputs,
    rewrite_tensors,
    save_adapter,
)

TENSORS = "adapter_model.safetensors"


def test_a_directory_is_parsed_once_and_named_by_that_parse(tmp_path: Path) -> None:
    path = save_adapter(tiny_llama, lora(["q_proj", "v_proj"]), tmp_path / "a")
    local = inspect_directory(path)
    assert local.header is not None
    raw = (path / TENSORS).read_bytes()
    assert local.header.raw == raw[: local.header.header.data_start]
    assert local.digest == directory_identity(local.config, local.tensors_path)
    adapter = adapter_from_local(local)
    ids = sample_ids()
    with AdapterHost(tiny_llama(), HostConfig(targets=["q_proj", "v_proj"])) as host:
        host.swap(adapter)
        outputs = model_outputs(host.model, ids)
        assert (outputs - peft_outputs(tiny_llama, path, ids)).abs().max() < MAX_DIFF
        assert (outputs - model_outputs(tiny_llama(), ids)).abs().max() > 100 * MAX_DIFF


def test_a_pulled_layer_is_viewed_in_one_buffer(tmp_path: Path) -> None:
    tensors = {"a": torch.randn(3, 5), "b": torch.arange(4, dtype=torch.float16)}
    save_file(tensors, str(tmp_path / "t.safetensors"))
    loaded = tensors_from_bytes((tmp_path / "t.safetensors").read_bytes(), "t.safetensors")
    assert {t.untyped_storage().data_ptr() for t in loaded.values()} == {
        loaded["a"].untyped_storage().data_ptr()
    }
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor)
    with pytest.raises(SwapError, match=r"t\.safetensors"):
        tensors_from_bytes(b"\x08" + b"\x00" * 7 + b"{}", "t.safetensors")


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


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([1.0, -7.5, 3.0], 7.5),  # the largest magnitude is negative
        ([float("nan"), 2.0], math.nan),
        ([2.0, float("nan")], math.nan),  # a NaN found by the min as well as by the max
        ([-float("inf"), 1.0], math.inf),
        ([], 0.0),
    ],
    ids=["negative", "nan-first", "nan-last", "minus-inf", "empty"],
)
def test_largest_magnitude(values: list[float], expected: float) -> None:
    for dtype in (torch.float32, torch.float64, torch.float16):
        found = largest(torch.tensor(values, dtype=dtype))
        assert (math.isnan(expected) and math.isnan(found)) or found == expected, dtype


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


def _set_factors(values: dict[str, float]) -> Callable[[dict[str, torch.Tensor]], None]:
    """Every factor small, the named ones (`fc1.lora_A`, ...) filled with their value."""

    def change(tensors: dict[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            tensor.fill_(0.01)
            for key, value in values.items():
                module, factor = key.split(".")
                if f".{module}.{factor}." in name:
                    tensor.fill_(value)

    return change


def test_one_pass_bounds_refuse_only_a_module_that_overflows(tmp_path: Path) -> None:
    """The factors are scanned together (one largest value for all); a module is refused
    for its own values only: large A in fc1 and large B in fc2 fit an fp16 host (each
    delta is small), large A and B in fc1 do not."""
    good = save_adapter(TinyMLP, lora(["fc1", "fc2"], r=4), tmp_path / "good")
    apart = rewrite_tensors(
        good, tmp_path / "apart", _set_factors({"fc1.lora_A": 200.0, "fc2.lora_B": 200.0})
    )
    together = rewrite_tensors(
        good, tmp_path / "together", _set_factors({"fc1.lora_A": 200.0, "fc1.lora_B": 200.0})
    )
    config = HostConfig(targets=["fc1", "fc2"], max_rank=4, dtype=torch.float16)
    with AdapterHost(TinyMLP(), config) as host:
        event = host.swap(apart)
        assert host.active_digest == event.digest
        bounds = host.active.bounds  # type: ignore[union-attr]
        assert {b.exact for b in bounds.values()} == {False}
        assert bounds["fc1"].a >= 200.0  # one bound for all the factors, an upper one
        with pytest.raises(NonFiniteAdapter, match=r"fc1 delta.*float16"):
            host.swap(together)
        assert host.active_digest == event.digest


def test_a_nan_found_by_the_one_pass_scan_names_its_tensor(tmp_path: Path) -> None:
    good = save_adapter(TinyMLP, lora(["fc1", "fc2"], r=4), tmp_path / "good")
    bad = rewrite_tensors(good, tmp_path / "bad", _set_factors({"fc2.lora_B": math.nan}))
    with AdapterHost(TinyMLP(), HostConfig(targets=["fc1", "fc2"], max_rank=4)) as host:
        with pytest.raises(NonFiniteAdapter, match=r"fc2\.lora_B holds NaN"):
            host.swap(bad)
        assert host.active is None


def test_a_file_buffer_is_reused_only_once_nothing_holds_it() -> None:
    pool = BufferPool(max_free=1)
    first = pool.take(HUGE_PAGE)
    first.fill_(7)
    view = first[10:20]  # a tensor of an adapter still held
    del first
    second = pool.take(HUGE_PAGE)
    assert second.data_ptr() != view.data_ptr() - 10
    second.fill_(1)
    assert bool((view == 7).all())  # the held buffer was not handed out again
    address = view.data_ptr() - 10
    del view
    assert pool.take(HUGE_PAGE).data_ptr() == address  # free again: reused
    assert pool.take(3 * HUGE_PAGE).numel() == 3 * HUGE_PAGE  # too small ones are not


def test_tensors_viewed_in_a_file_buffer_keep_their_shapes_and_values(tmp_path: Path) -> None:
    tensors = {
        "cube": torch.randn(2, 3, 4),
        "scalar": torch.tensor(1.5),
        "empty": torch.zeros(0, 5),
        "row": torch.randn(1, 7, dtype=torch.float64),
        "half": torch.randn(3, dtype=torch.float16),
    }
    save_file(tensors, str(tmp_path / "t.safetensors"))
    loaded = tensors_from_bytes((tmp_path / "t.safetensors").read_bytes(), "t.safetensors")
    for name, tensor in tensors.items():
        assert loaded[name].shape == tensor.shape, name
        assert loaded[name].is_contiguous(), name
        assert torch.equal(loaded[name], tensor), name
