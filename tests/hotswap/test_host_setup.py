"""Attaching a host: targets, clear errors, the cache's bounds, detaching cleanly (buffers
released, an existing instance forward put back), fixed slot memory, scaled embeddings."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import pytest
import torch
from accelerate.hooks import ModelHook, add_hook_to_module
from peft import PeftModel
from transformers.models.gemma3.modeling_gemma3 import Gemma3TextScaledWordEmbedding

from peftreg.hotswap import (
    AdapterCache,
    AdapterHost,
    HostConfig,
    HostError,
    LoadedAdapter,
    SwapEvent,
    UnsupportedAdapter,
)
from tests.adapters.tiny_models import sample_ids, tiny_llama
from tests.hotswap.builders import (
    MAX_DIFF,
    TinyMLP,
    lora,
    model_outputs,
    peft_outputs,
    prompt_tuning,
    save_adapter,
)


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
    with pytest.raises(HostError, match="already wrapped by another AdapterHost"):
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
    from peftreg.adapters.schema import AdapterConfig, BaseReference

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
    from peftreg.formats.fingerprint import fingerprint_directory
    from peftreg.hotswap import module_fingerprint
    from tests.adapters.tiny_models import tiny_gpt2

    for make in (tiny_llama, tiny_gpt2):  # GPT-2 ties lm_head to the token embeddings
        model = make()
        model.save_pretrained(str(tmp_path / make.__name__))
        on_disk = fingerprint_directory(tmp_path / make.__name__)
        in_memory = module_fingerprint(model)
        assert in_memory == on_disk
        assert module_fingerprint(model, content=False).structure_hash == on_disk.structure_hash


class CountingHook(ModelHook):
    """An accelerate hook (what device maps install): it replaces the instance's forward."""

    def __init__(self) -> None:
        self.calls = 0

    def pre_forward(
        self, module: torch.nn.Module, *args: object, **kwargs: object
    ) -> tuple[tuple[object, ...], dict[str, object]]:
        self.calls += 1
        return args, kwargs


def test_a_hooked_instance_forward_is_wrapped_and_put_back(tmp_path: Path) -> None:
    path = save_adapter(tiny_llama, lora(["q_proj"]), tmp_path / "a")
    ids = sample_ids()
    want = peft_outputs(tiny_llama, path, ids)
    model = tiny_llama()
    hook = CountingHook()
    add_hook_to_module(model, hook)
    hooked = vars(model)["forward"]
    host = AdapterHost(model, HostConfig(targets=["q_proj"]))
    host.swap(path)
    assert (model_outputs(model, ids) - want).abs().max().item() <= MAX_DIFF
    assert hook.calls == 1  # accelerate's forward ran, inside the gate
    with pytest.raises(HostError, match="already wrapped by another AdapterHost"):
        AdapterHost(model, HostConfig(targets=["v_proj"]))
    host.detach()
    assert vars(model)["forward"] is hooked
    model_outputs(model, ids)
    assert hook.calls == 2


@pytest.mark.parametrize("mode", ["unmerged", "merged"])
def test_detach_releases_the_hosts_buffers(mode: str) -> None:
    model = tiny_llama()
    config = HostConfig(targets=["q_proj"], mode=mode, max_virtual_tokens=2)  # type: ignore[arg-type]
    host = AdapterHost(model, config)
    assert host.prompt is not None
    held = [weakref.ref(host.prompt.active.embeds), weakref.ref(host.prompt.spare.embeds)]
    held += [
        weakref.ref(t) for s in host.slots.values() for t in s.active.tensors() + s.spare.tensors()
    ]
    if host.pristine is not None:
        held += [weakref.ref(t) for t in host.pristine.weights.values()]
    assert len(held) > 2
    host.detach()
    gc.collect()
    assert [ref for ref in held if ref() is not None] == []
    assert host.nbytes == 0
    assert (host.slots, host.pristine, host.prompt) == ({}, None, None)


def test_slot_memory_is_reused_across_ranks(tmp_path: Path) -> None:
    """Swapping ranks 2 and 4 (and unloading) writes into the buffers allocated at attach;
    rank 8, the host's max rank, is served from the adapter's own tensors (nothing copied
    into the slots, nothing allocated by the host)."""
    paths = [
        save_adapter(tiny_llama, lora(["q_proj", "v_proj"], r=r), tmp_path / f"r{r}", seed=r)
        for r in (2, 4, 8)
    ]
    model = tiny_llama()
    config = HostConfig(targets=["q_proj", "v_proj"], max_rank=8, max_virtual_tokens=2)
    with AdapterHost(model, config) as host:
        assert host.prompt is not None

        def pointers() -> set[int]:
            tensors = [t for s in host.slots.values() for own in s.own for t in own.tensors()]
            tensors += [host.prompt.active.embeds, host.prompt.spare.embeds]  # type: ignore[union-attr]
            return {t.data_ptr() for t in tensors}

        def active() -> set[int]:
            return {t.data_ptr() for s in host.slots.values() for t in (s.active.a, s.active.b)}

        attached, reserved = pointers(), host.nbytes
        copied = 0
        for path in [*paths, paths[0], paths[2], paths[1]]:
            event = host.swap(path)
            copied += event.bytes_copied
            assert pointers() == attached
            adapter = host.active
            assert adapter is not None
            factors = {t.data_ptr() for f in adapter.factors.values() for t in (f.a, f.b)}
            if path == paths[2]:
                assert active() == factors  # in place: the adapter's own tensors
                assert host.nbytes > reserved  # its gain vector, shared by every resident set
                resident = host.nbytes
            else:
                assert active() <= attached
        assert copied > 0
        host.unload()
        assert pointers() == attached
        assert active() <= attached
        assert host.nbytes == resident


def test_a_directory_swapped_again_comes_from_the_cache(tmp_path: Path) -> None:
    first = save_adapter(tiny_llama, lora(["q_proj"]), tmp_path / "a", seed=1)
    second = save_adapter(tiny_llama, lora(["q_proj"]), tmp_path / "b", seed=2)
    with AdapterHost(tiny_llama(), HostConfig(targets=["q_proj"])) as host:
        assert not host.swap(first).cached
        assert not host.swap(second).cached
        again = host.swap(first)
        assert again.cached  # found by its directory identity: the tensors were not re-read
        assert host.cache.digests() == [host.load(second).digest, again.digest]


class ScaledEmbeddingModel(torch.nn.Module):
    """Gemma 3's scaled token embeddings (lookups times embed_scale) under a linear head."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed_tokens = Gemma3TextScaledWordEmbedding(64, 16, padding_idx=0, embed_scale=4.0)
        self.head = torch.nn.Linear(16, 8)

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.embed_tokens  # (so PEFT saves the base weight beside the adapter)

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed_tokens(x))  # type: ignore[no-any-return]


@pytest.mark.parametrize("mode", ["unmerged", "merged"])
def test_scaled_embeddings_match_peft(mode: str, tmp_path: Path) -> None:
    path = save_adapter(ScaledEmbeddingModel, lora(["embed_tokens"]), tmp_path / "a")
    ids = sample_ids()
    model = ScaledEmbeddingModel()
    with torch.no_grad():
        base = model(ids)
        want = PeftModel.from_pretrained(ScaledEmbeddingModel(), str(path)).eval()(ids)
    config = HostConfig(targets=["embed_tokens"], mode=mode)  # type: ignore[arg-type]
    with AdapterHost(model, config) as host, torch.no_grad():
        host.swap(path)
        got = model(ids)
    assert (want - base).abs().max().item() > 1e-3
    assert (want - got).abs().max().item() <= MAX_DIFF


def test_an_adapter_that_replaces_the_embedding_is_refused(tmp_path: Path) -> None:
    """PEFT saves a targeted embedding's base weight; a different one would replace ours."""
    other_base = save_adapter(
        lambda: ScaledEmbeddingModel(seed=1), lora(["embed_tokens"]), tmp_path / "a"
    )
    with AdapterHost(ScaledEmbeddingModel(), HostConfig(targets=["embed_tokens"])) as host:
        with pytest.raises(
            UnsupportedAdapter, match="carries its own base weight for embed_tokens"
        ):
            host.swap(other_base)
        assert host.active_digest is None
