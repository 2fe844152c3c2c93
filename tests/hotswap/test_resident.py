"""Adapters served in place (resident sets): a swap to an adapter of the host's max rank
copies nothing, computes what peft computes, never writes the adapter, and an active
adapter evicted from the LRU stays intact while it is active."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import pytest
import torch
from torch import nn

from peftreg.hotswap import AdapterHost, HostConfig
from peftreg.hotswap.tensorfile import HUGE_PAGE
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


def _resident(host: AdapterHost, names: list[str]) -> bool:
    return all(host.slots[name].active.resident for name in names)


def test_warm_swaps_in_place_match_peft_and_copy_nothing(tmp_path: Path) -> None:
    paths = [
        save_adapter(TinyMLP, lora(["fc1", "fc2"], r=4), tmp_path / f"a{i}", seed=i)
        for i in range(3)
    ]
    x = mlp_input()
    want = [peft_outputs(TinyMLP, path, x) for path in paths]
    config = HostConfig(targets=["fc1", "fc2", "out"], max_rank=4)
    with AdapterHost(TinyMLP(), config) as host:
        loaded = [host.load(path) for path in paths]
        for index in [0, 1, 2, 1, 0, 2, 2, 1]:
            event = host.swap(loaded[index])
            assert event.cached
            assert _resident(host, ["fc1", "fc2"])
            assert not host.slots["out"].active.resident  # untargeted: staged empty
            got = model_outputs(host.model, x)
            assert (got - want[index]).abs().max().item() <= MAX_DIFF, index
        assert event.bytes_copied == 0  # the untargeted slot's spare was already empty
        host.unload()
        assert torch.equal(model_outputs(host.model, x), model_outputs(TinyMLP(), x))


def test_in_place_and_staged_adapters_alternate_without_writing_either(tmp_path: Path) -> None:
    """Rank 4 (in place) and rank 2 (staged by copy) in turns: outputs stay peft's and the
    cached adapters' tensors are never written."""
    paths = [
        save_adapter(TinyMLP, lora(["fc1"], r=4), tmp_path / "r4", seed=1),
        save_adapter(TinyMLP, lora(["fc1", "fc2"], r=2), tmp_path / "r2", seed=2),
        save_adapter(TinyMLP, lora(["fc2"], r=4, lora_dropout=0.0), tmp_path / "r4b", seed=3),
    ]
    x = mlp_input()
    want = [peft_outputs(TinyMLP, path, x) for path in paths]
    config = HostConfig(targets=["fc1", "fc2"], max_rank=4)
    with AdapterHost(TinyMLP(), config) as host:
        loaded = [host.load(path) for path in paths]
        before = [
            {name: (f.a.clone(), f.b.clone()) for name, f in adapter.factors.items()}
            for adapter in loaded
        ]
        for index in [0, 1, 0, 2, 1, 2, 0, 1, 1, 2]:
            host.swap(loaded[index])
            got = model_outputs(host.model, x)
            assert (got - want[index]).abs().max().item() <= MAX_DIFF, index
        for adapter, saved in zip(loaded, before, strict=True):
            for name, (a, b) in saved.items():
                assert torch.equal(adapter.factors[name].a, a)
                assert torch.equal(adapter.factors[name].b, b)


class WideMLP(nn.Module):
    """Two 512-wide layers: a rank-256 adapter's tensors file is over the file buffer
    pool's huge-page threshold, so cold loads read into pooled buffers."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(512, 512)
        self.fc2 = nn.Linear(512, 512)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))  # type: ignore[no-any-return]


def test_an_evicted_adapter_still_active_is_not_reused(tmp_path: Path) -> None:
    """The LRU holds one adapter: loading others evicts the active one, and the file
    buffers they are read into must not be the active adapter's."""
    rank = 256
    paths = [
        save_adapter(WideMLP, lora(["fc1", "fc2"], r=rank), tmp_path / f"w{i}", seed=i)
        for i in range(4)
    ]
    assert (paths[0] / "adapter_model.safetensors").stat().st_size >= HUGE_PAGE
    x = torch.randn(3, 512, generator=torch.Generator().manual_seed(5))
    want = peft_outputs(WideMLP, paths[0], x)
    config = HostConfig(targets=["fc1", "fc2"], max_rank=rank, cache_entries=1)
    with AdapterHost(WideMLP(), config) as host:
        host.swap(paths[0])
        assert _resident(host, ["fc1", "fc2"])
        for path in paths[1:]:
            host.load(path)  # read into pooled buffers; evicts the previous entry
        assert host.active is not None
        assert host.active.digest not in host.cache
        assert (model_outputs(host.model, x) - want).abs().max().item() <= MAX_DIFF
        host.swap(paths[3])  # from the LRU; the evicted adapter's buffer is free now
        host.swap(paths[1])  # read again, maybe into that buffer
        want = peft_outputs(WideMLP, paths[1], x)
        assert (model_outputs(host.model, x) - want).abs().max().item() <= MAX_DIFF


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_another_slot_dtype_is_staged_by_copy(tmp_path: Path, dtype: torch.dtype) -> None:
    path = save_adapter(TinyMLP, lora(["fc1"], r=4), tmp_path / "a")
    config = HostConfig(targets=["fc1"], max_rank=4, dtype=dtype)
    with AdapterHost(TinyMLP(), config) as host:
        event = host.swap(path)
        assert event.bytes_copied > 0
        assert not host.slots["fc1"].active.resident


def test_nothing_keeps_an_adapter_served_in_place_once_dropped(tmp_path: Path) -> None:
    """Resident sets of a layout are made from per-layout templates: neither they nor the
    host keep an adapter's tensors once it is out of the LRU and no longer active."""
    first = save_adapter(TinyMLP, lora(["fc1", "fc2"], r=4), tmp_path / "a0", seed=1)
    paths = [first] + [
        rewrite_tensors(
            first, tmp_path / f"a{i}", lambda t, i=i: [v.mul_(i + 1) for v in t.values()]
        )
        for i in range(1, 4)
    ]
    x = mlp_input()
    held = []
    with AdapterHost(TinyMLP(), HostConfig(targets=["fc1", "fc2"], max_rank=4)) as host:
        for path in paths:
            host.swap(path)
            assert _resident(host, ["fc1", "fc2"])
            adapter = host.active
            assert adapter is not None
            held += [weakref.ref(adapter.factors["fc1"].a), weakref.ref(adapter.factors["fc2"].b)]
            want = peft_outputs(TinyMLP, path, x)
            assert (model_outputs(host.model, x) - want).abs().max().item() <= MAX_DIFF
        del adapter
        host.cache.clear()
        host.unload()
        gc.collect()
        assert [ref for ref in held if ref() is not None] == []
