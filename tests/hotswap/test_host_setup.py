"""Attaching a host: targets, clear errors, the cache's bounds, detaching cleanly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from client.hotswap import (
    AdapterCache,
    AdapterHost,
    HostConfig,
    HostError,
    LoadedAdapter,
    SwapEvent,
    UnsupportedAdapter,
)
from tests.adapters.tiny_models import sample_ids, tiny_llama
from tests.hotswap.builders import TinyMLP, lora, model_outputs, prompt_tuning, save_adapter


def test_targets_by_name_pattern_and_all_linear() -> None:
    model = tiny_llama()
    by_name = AdapterHost(model, HostConfig(targets=["q_proj", "embed_tokens"]))
    assert [s.name for s in by_name.sites] == [
        "model.embed_tokens",
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.q_proj",
    ]
    assert by_name.sites[0].layer == "embedding"
    by_name.detach()
    pattern = AdapterHost(model, HostConfig(targets=r"model\.layers\.1\..*_proj"))
    assert len(pattern.sites) == 7
    pattern.detach()
    every = AdapterHost(model, HostConfig())
    assert len(every.sites) == 14  # 7 linear layers x 2, not lm_head
    assert all(site.name != "lm_head" for site in every.sites)
    every.detach()


def test_attach_errors_name_the_cause() -> None:
    model = tiny_llama()
    with pytest.raises(HostError, match="no module of LlamaForCausalLM matches"):
        AdapterHost(model, HostConfig(targets=["nothing"]))
    with pytest.raises(HostError, match="is a LlamaMLP"):
        AdapterHost(model, HostConfig(targets=["mlp"]))
    with pytest.raises(HostError, match="max_rank must be at least 1"):
        HostConfig(max_rank=0)
    with pytest.raises(HostError, match="move the model before attaching"):
        AdapterHost(model, HostConfig(device="meta"))
    with pytest.raises(HostError, match="no get_input_embeddings"):
        AdapterHost(TinyMLP(), HostConfig(max_virtual_tokens=2))
    host = AdapterHost(model, HostConfig(targets=["q_proj"]))
    with pytest.raises(HostError, match="already wrapped"):
        AdapterHost(model, HostConfig(targets=["v_proj"]))
    host.detach()
    with pytest.raises(HostError, match="detached"):
        host.unload()


def test_detach_leaves_the_plain_model(tmp_path: Path) -> None:
    path = save_adapter(tiny_llama, lora(["q_proj", "v_proj"]), tmp_path / "a")
    model = tiny_llama()
    ids = sample_ids()
    base = model_outputs(model, ids)
    host = AdapterHost(model, HostConfig(targets=["q_proj", "v_proj"], max_virtual_tokens=2))
    host.swap(path)
    assert not torch.equal(model_outputs(model, ids)[:, 2:], base)
    host.detach()
    assert "forward" not in vars(model)
    assert torch.equal(model_outputs(model, ids), base)


def test_adapters_the_host_does_not_serve(tmp_path: Path) -> None:
    model = tiny_llama()
    prompt = save_adapter(tiny_llama, prompt_tuning(3), tmp_path / "p")
    dora = save_adapter(tiny_llama, lora(["q_proj"], use_dora=True), tmp_path / "d")
    events: list[SwapEvent] = []
    with AdapterHost(model, HostConfig(targets=["q_proj"], dora=False)) as host:
        host.subscribe(on_swap=events.append)
        with pytest.raises(UnsupportedAdapter, match="max_virtual_tokens >= 3"):
            host.swap(prompt)
        with pytest.raises(UnsupportedAdapter, match="dora=False"):
            host.swap(dora)
        assert host.active_digest is None
        assert events == []


def _fake(digest: str, values: int) -> LoadedAdapter:
    from client.adapters.schema import AdapterConfig, BaseReference

    config = AdapterConfig(
        kind="prompt_tuning",
        base=BaseReference(),
        dtype="F32",
        parameters=values,
        bytes=4 * values,
        tensors=[],
        peft_config={},
        num_virtual_tokens=1,
    )
    return LoadedAdapter(digest, digest, config, prompt=torch.zeros(1, values))


def test_cache_is_lru_bounded_by_entries_and_bytes() -> None:
    cache = AdapterCache(max_entries=3, max_bytes=400)
    for name in "abc":
        cache.put(_fake(name, 25))  # 100 bytes each
    assert cache.get("a") is not None  # a is now the most recent
    cache.put(_fake("d", 25))
    assert cache.digests() == ["c", "a", "d"]  # b, least recently used, went
    cache.put(_fake("e", 50))  # 200 bytes: c goes (four entries), then 400 bytes fit
    assert cache.digests() == ["a", "d", "e"]
    assert cache.nbytes == 400
    cache.put(_fake("f", 50))  # a and d go: the byte bound
    assert cache.digests() == ["e", "f"]
    cache.put(_fake("huge", 200))  # 800 bytes alone: never kept
    assert "huge" not in cache
    assert (cache.hits, cache.misses) == (1, 0)
    assert cache.get("b") is None
    assert cache.misses == 1


def test_module_fingerprint_is_the_saved_directorys(tmp_path: Path) -> None:
    from client.formats.fingerprint import fingerprint_directory
    from client.hotswap import module_fingerprint
    from tests.adapters.tiny_models import tiny_gpt2

    for make in (tiny_llama, tiny_gpt2):  # GPT-2 ties lm_head to the token embeddings
        model = make()
        model.save_pretrained(str(tmp_path / make.__name__))
        on_disk = fingerprint_directory(tmp_path / make.__name__)
        in_memory = module_fingerprint(model)
        assert in_memory == on_disk
        assert module_fingerprint(model, content=False).structure_hash == on_disk.structure_hash
