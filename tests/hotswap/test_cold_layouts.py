"""A cold load of an adapter whose layout (config and tensors header bytes) was seen before:
its config is not resolved again, its factors are views placed by the known layout, its
values are scanned while the file is read, and every refusal of the full path still holds."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from peftreg.hotswap import AdapterHost, HostConfig, NonFiniteAdapter, SwapError, tensorfile
from peftreg.hotswap.adapter import adapter_from_local, inspect_directory
from peftreg.hotswap.tensorfile import SpanScan
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


def _same_layout(tmp_path: Path, count: int) -> list[Path]:
    """`count` adapters of one layout (same config, same header), other values."""
    first = save_adapter(TinyMLP, lora(["fc1", "fc2"], r=4), tmp_path / "l0", seed=1)
    paths = [first]
    for index in range(1, count):
        generator = torch.Generator().manual_seed(index)

        def change(tensors: dict[str, torch.Tensor], g: torch.Generator = generator) -> None:
            for tensor in tensors.values():
                tensor.copy_(torch.randn(tensor.shape, generator=g))

        paths.append(rewrite_tensors(first, tmp_path / f"l{index}", change))
    return paths


def test_adapters_of_a_known_layout_load_through_it_and_match_peft(tmp_path: Path) -> None:
    paths = _same_layout(tmp_path, 4)
    x = mlp_input()
    config = HostConfig(targets=["fc1", "fc2"], max_rank=4, cache_entries=1)
    with AdapterHost(TinyMLP(), config) as host:
        layouts = []
        for path in [*paths, paths[0]]:
            host.cache.clear()
            event = host.swap(path)
            assert not event.cached
            assert host.active is not None
            layouts.append(host.active.layout)
            held = [
                t for f in host.active.factors.values() for t in (f.a, f.b, f.bias) if t is not None
            ]
            assert host.active.nbytes == sum(t.numel() * t.element_size() for t in held)
            got = model_outputs(host.model, x)
            assert (got - peft_outputs(TinyMLP, path, x)).abs().max().item() <= MAX_DIFF
    known = [layout for layout in layouts[1:] if layout is not None]
    assert len(known) >= 3  # after the first, the layout is known ...
    assert all(layout is known[0] for layout in known)  # ... and one for all of them


def test_a_nan_in_an_adapter_of_a_known_layout_is_refused_by_name(tmp_path: Path) -> None:
    good, _other = _same_layout(tmp_path, 2)

    def poison(tensors: dict[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            if "fc2.lora_B" in name:
                tensor[0, 0] = math.nan

    bad = rewrite_tensors(good, tmp_path / "bad", poison)
    config = HostConfig(targets=["fc1", "fc2"], max_rank=4)
    with AdapterHost(TinyMLP(), config) as host:
        host.swap(good)
        host.swap(_other)  # the layout is known now
        with pytest.raises(NonFiniteAdapter, match=r"fc2\.lora_B holds NaN"):
            host.swap(bad)
        assert host.active is not None
        assert host.active.source == str(_other)


def test_a_changed_config_of_a_known_header_is_resolved_again(tmp_path: Path) -> None:
    first, second = _same_layout(tmp_path, 2)
    x = mlp_input()
    with AdapterHost(TinyMLP(), HostConfig(targets=["fc1", "fc2"], max_rank=4)) as host:
        host.swap(first)
        host.swap(second)
        document = json.loads((second / "adapter_config.json").read_text())
        document["lora_alpha"] = 3 * document["lora_alpha"]
        (second / "adapter_config.json").write_text(json.dumps(document))
        host.cache.clear()
        host.swap(second)
        got = model_outputs(host.model, x)
        assert (got - peft_outputs(TinyMLP, second, x)).abs().max().item() <= MAX_DIFF


def test_a_pickle_beside_a_known_layout_is_still_refused(tmp_path: Path) -> None:
    first, second = _same_layout(tmp_path, 2)
    adapter_from_local(inspect_directory(first))
    adapter_from_local(inspect_directory(second))  # config and layout known
    (second / "adapter_model.bin").write_bytes(b"\x80\x04N.")
    with pytest.raises(SwapError, match="is a pickle file and is never loaded"):
        inspect_directory(second)


def test_the_span_scan_bounds_every_value_whatever_the_chunks() -> None:
    values = np.linspace(-3.0, 2.5, 1001, dtype=np.float32)
    data = np.concatenate([np.zeros(12, np.uint8), values.view(np.uint8), np.zeros(5, np.uint8)])
    begin, end = 12, 12 + values.nbytes
    norm = float(np.sqrt(np.sum(values.astype(np.float64) ** 2)))
    every = list(range(4, len(data) + 4, 4))
    for pieces in ([len(data)], [12, 16, 116, 4000, len(data)], every):
        scan = SpanScan(begin, end)
        assert math.isnan(scan.bound)  # nothing read yet
        for start, stop in reversed(list(itertools.pairwise([0, *pieces]))):  # any order
            scan.add(data, start, min(stop, len(data)))
        assert 3.0 <= norm <= scan.bound <= norm * 1.01
    for bad, want in ((math.nan, math.isnan), (-math.inf, math.isinf), (3e20, math.isinf)):
        spoiled = values.copy()
        spoiled[777] = bad
        data[begin:end] = spoiled.view(np.uint8)
        scan = SpanScan(begin, end)
        scan.add(data, 0, 500)
        assert math.isnan(scan.bound)  # not all of it yet
        scan.add(data, 500, len(data))
        assert want(scan.bound), bad


@pytest.mark.parametrize("preadv", [True, False])
def test_a_file_of_many_chunks_is_read_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, preadv: bool
) -> None:
    """By the caller and the helper thread at once (preadv), or by the caller alone."""
    monkeypatch.setattr(tensorfile, "_PREADV", preadv and tensorfile._PREADV)
    tensors = {"big": torch.randn(3 * tensorfile.CHUNK // 4 + 5), "small": torch.randn(3, 5)}
    save_file(tensors, str(tmp_path / "t.safetensors"))
    read = tensorfile.read_prefix(tmp_path / "t.safetensors")
    for _ in range(3):
        loaded = tensorfile.read_file_once(read)
        assert all(torch.equal(loaded[name], tensor) for name, tensor in tensors.items())
