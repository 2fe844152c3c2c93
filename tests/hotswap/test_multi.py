"""Multi-adapter batches: every row of a mixed batch (LoRA ranks 4/8/16, rsLoRA, DoRA, NOLA,
prompt tuning of two lengths, base-only) equals that adapter's single-adapter `AdapterHost`
output (fp32, within 1e-5) on a tiny Llama and on GPT-2; KV-cached generation per row equals
peft's; slots are reused without reallocation, the LRU makes room, and bad input is refused."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import PreTrainedModel

from peftreg.hotswap import AdapterHost, HostConfig, InputNotSupported, LoadedAdapter
from peftreg.hotswap.multi import MultiAdapterHost, SlotsBusy
from peftreg.hotswap.multi.host import NameBinding
from tests.adapters.tiny_models import tiny_gpt2, tiny_llama
from tests.hotswap.builders import (
    MAX_DIFF,
    lora,
    model_outputs,
    nola_adapter,
    prompt_tuning,
    save_adapter,
)

VIRTUAL = 8
LENGTH = 10
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LLAMA_TARGETS += ["embed_tokens"]
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc", "wte"]


@dataclass
class Family:
    """A model, the host config both modes attach with, and its adapters (None: base)."""

    make: Callable[[], PreTrainedModel]
    config: HostConfig
    adapters: dict[str, Path]
    as_lora: dict[str, Path]  # what peft loads, where it differs (NOLA materialized)


def _llama(root: Path) -> Family:
    make = tiny_llama
    nola = nola_adapter(
        make, ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj"], root / "n"
    )
    adapters = {
        "lora4": save_adapter(make, lora(["q_proj", "v_proj", "embed_tokens"], r=4), root / "l4"),
        "lora8": save_adapter(make, lora(LLAMA_TARGETS[:7], r=8), root / "l8", seed=8),
        "lora16": save_adapter(make, lora(["k_proj", "down_proj"], r=16), root / "l16", seed=16),
        "rslora": save_adapter(
            make,
            lora(["q_proj", "up_proj"], r=8, use_rslora=True, rank_pattern={"up_proj": 2}),
            root / "rs",
            seed=5,
        ),
        "dora": save_adapter(
            make, lora(["q_proj", "o_proj", "gate_proj"], use_dora=True), root / "dora", seed=9
        ),
        "bias": save_adapter(make, lora(["o_proj"], lora_bias=True), root / "bias", seed=4),
        "nola": nola[0],
        "prompt5": save_adapter(make, prompt_tuning(5), root / "p5", seed=2),
        "prompt8": save_adapter(make, prompt_tuning(8), root / "p8", seed=3),
    }
    config = HostConfig(targets=LLAMA_TARGETS, max_rank=16, max_virtual_tokens=VIRTUAL)
    return Family(make, config, adapters, {"nola": nola[1]})


def _gpt2(root: Path) -> Family:
    make = tiny_gpt2
    fan = {"fan_in_fan_out": True}
    adapters = {
        "lora4": save_adapter(make, lora(["c_attn", "c_fc"], r=4, **fan), root / "l4"),
        "lora16": save_adapter(make, lora(["c_attn", "c_proj"], r=16, **fan), root / "l16"),
        "rslora": save_adapter(
            make, lora(["c_fc"], r=8, use_rslora=True, **fan), root / "rs", seed=5
        ),
        "dora": save_adapter(make, lora(["c_attn"], use_dora=True, **fan), root / "d", seed=9),
        "embed": save_adapter(make, lora(["wte"], r=8), root / "wte", seed=6),
        "prompt3": save_adapter(make, prompt_tuning(3), root / "p3", seed=2),
    }
    config = HostConfig(targets=GPT2_TARGETS, max_rank=16, max_virtual_tokens=4)
    return Family(make, config, adapters, {})


@pytest.fixture(scope="module")
def families(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Family]:
    root = tmp_path_factory.mktemp("multi-adapters")
    (root / "llama").mkdir()
    (root / "gpt2").mkdir()
    return {"llama": _llama(root / "llama"), "gpt2": _gpt2(root / "gpt2")}


def _ids(rows: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 64, (rows, LENGTH), generator=torch.Generator().manual_seed(seed))


def _single(
    family: Family,
    rows: dict[str | None, list[int]],
    ids: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each adapter alone on an `AdapterHost` (the single-adapter mode), on its rows; the
    outputs at the real positions."""
    mask = torch.ones_like(ids) if mask is None else mask
    model = family.make()
    outputs: list[torch.Tensor] = [torch.empty(0)] * ids.shape[0]
    with AdapterHost(model, family.config) as host:
        for key, indices in rows.items():
            if key is None:
                host.unload()
            else:
                host.swap(family.adapters[key])
            got = model_outputs(model, ids[indices], attention_mask=mask[indices])
            got = got[:, family.config.max_virtual_tokens :]
            for position, row in enumerate(indices):
                outputs[row] = got[position]
    return torch.stack(outputs)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_every_row_of_a_mixed_batch_equals_its_single_adapter_output(
    name: str, families: dict[str, Family]
) -> None:
    family = families[name]
    keys: list[str | None] = [*family.adapters, None]
    keys = [*keys, *reversed(keys)]  # each adapter twice, at different rows
    ids = _ids(len(keys))
    mask = torch.ones_like(ids)
    for row in range(0, len(keys), 3):
        mask[row, : 1 + row % 4] = 0  # left padding, of different lengths
    real = mask.bool()
    model = family.make()
    base = model_outputs(family.make(), ids, attention_mask=mask)
    virtual = family.config.max_virtual_tokens
    with MultiAdapterHost(model, family.config, slots=len(family.adapters)) as host:
        for label, path in family.adapters.items():
            host.load(path, name=label)
        with host.batch(keys) as assignment:
            got = model_outputs(model, ids, attention_mask=mask)[:, virtual:]
        assert len(set(assignment.slots)) == len(family.adapters) + 1
    rows: dict[str | None, list[int]] = {}
    for row, key in enumerate(keys):
        rows.setdefault(key, []).append(row)
    want = _single(family, rows, ids, mask)
    for row, key in enumerate(keys):
        difference = (got[row] - want[row])[real[row]]
        assert difference.abs().max().item() <= MAX_DIFF, (row, key)
        if key is not None:  # the adapter acts
            assert (want[row] - base[row])[real[row]].abs().max().item() > 1e-3, key


NEW_TOKENS = 5


def _generate(
    model: torch.nn.Module, ids: torch.Tensor, **kwargs: object
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequences, logits of every generated step), greedy, with the KV cache."""
    with torch.no_grad():
        out = model.generate(  # type: ignore[operator]
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            return_dict_in_generate=True,
            output_logits=True,
            pad_token_id=0,
            **kwargs,
        )
    return out.sequences, torch.stack(out.logits, dim=1)


def _greedy_without_cache(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """peft's prompt tuning, greedy by whole-sequence forwards (peft 0.21's cached generate
    prepends the virtual tokens at every step with transformers 5.25)."""
    sequences = ids
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            last = model(input_ids=sequences).logits[:, -1]
            sequences = torch.cat([sequences, last.argmax(-1, keepdim=True)], dim=1)
    return sequences


def test_generation_per_row_equals_peft(families: dict[str, Family]) -> None:
    """KV-cached generate on a mixed batch; the LoRA-family rows against peft's own mixed
    batch (`adapter_names=`), prompt-tuning rows against peft's prompt tuning."""
    family = families["llama"]
    mixed = ["lora8", "nola", "rslora"]  # what peft's mixed batches serve
    keys: list[str | None] = ["lora8", "prompt5", "dora", None, "nola", "rslora"]
    ids = _ids(len(keys), seed=3)
    model = family.make()
    sources = [None if key is None else family.adapters[key] for key in keys]
    # Loaded on demand, from the directories.
    with MultiAdapterHost(model, family.config, slots=6) as host, host.batch(sources):
        got, logits = _generate(model, ids)
    peft = None
    for label in mixed:
        path = family.as_lora.get(label, family.adapters[label])
        if peft is None:
            peft = PeftModel.from_pretrained(family.make(), str(path), adapter_name=label)
        else:
            peft.load_adapter(str(path), adapter_name=label)
    assert peft is not None
    rows = [row for row, key in enumerate(keys) if key in mixed or key is None]
    names = [keys[row] or "__base__" for row in rows]
    want, want_logits = _generate(peft.eval(), ids[rows], adapter_names=names)
    assert torch.equal(got[rows], want)
    assert (logits[rows] - want_logits).abs().max().item() <= MAX_DIFF
    base, _ = _generate(family.make(), ids[rows])
    assert not torch.equal(want, base)  # the adapters change what is generated
    for row, key in enumerate(keys):
        if key is None or key in mixed:
            continue
        reference = PeftModel.from_pretrained(family.make(), str(family.adapters[key])).eval()
        if key == "dora":  # peft's mixed batches refuse DoRA: the adapter alone, cached
            want_row, want_logits = _generate(reference, ids[row : row + 1])
            assert (logits[row : row + 1] - want_logits).abs().max().item() <= MAX_DIFF
        else:
            want_row = _greedy_without_cache(reference, ids[row : row + 1])
        assert torch.equal(got[row : row + 1], want_row), key


def test_slots_are_reused_in_place_and_the_lru_makes_room(families: dict[str, Family]) -> None:
    """Loading writes into preallocated buffers (same storage); a full host drops the least
    recently used adapter no batch reads; a batch needing more slots than exist is refused
    and leaves nothing pinned; a forward outside a batch runs the base model."""
    family = families["llama"]
    adapters = family.adapters
    model = family.make()
    ids = _ids(1, seed=5).expand(2, -1)  # the same sequence in both rows
    with MultiAdapterHost(model, family.config, slots=2) as host:
        pointers = [t.data_ptr() for slot in host.stacked.values() for t in slot.tensors()]
        first = host.load(adapters["lora16"], name="big")
        second = host.load(adapters["lora4"], name="small")
        assert {first.slot, second.slot} == {0, 1}
        with host.batch(["big", "small"]):
            pass  # "small" is now the most recent
        with host.batch(["big", None]):
            mixed = model_outputs(model, ids)
        third = host.load(adapters["dora"])  # evicts "small", the least recently used
        assert third.slot == second.slot
        assert third.generation > second.generation
        assert set(host.resident()) == {first.digest, third.digest}
        with host.batch(["small", "big"]) as assignment:  # "small" comes back, from the LRU
            again = model_outputs(model, ids)
        assert assignment.digests == (second.digest, first.digest)
        assert (again[1] - mixed[0]).abs().max().item() <= MAX_DIFF
        with pytest.raises(SlotsBusy), host.batch(["big", "small", adapters["dora"]]):
            pass
        assert host.table.pins(first.digest) == 0
        assert [t.data_ptr() for s in host.stacked.values() for t in s.tensors()] == pointers
        outside = model_outputs(model, ids)  # every row on the base model
        assert (outside[0] - mixed[1]).abs().max().item() <= MAX_DIFF
        assert (outside[1] - mixed[1]).abs().max().item() <= MAX_DIFF
        assert (mixed[0] - mixed[1]).abs().max().item() > 1e-3
        with pytest.raises(InputNotSupported, match="names 3 rows"), host.batch([None] * 3):
            model_outputs(model, ids)
        assert host.evict("big")
        assert not host.evict("big")
        assert first.digest not in host.resident()


def test_a_loaded_adapter_object_and_a_digest_name_a_row(families: dict[str, Family]) -> None:
    family = families["gpt2"]
    model = family.make()
    ids = _ids(2, seed=6)
    with MultiAdapterHost(model, family.config, slots=2) as host:
        resident = host.load(family.adapters["lora4"])
        adapter = host.cache.get(resident.digest)
        assert isinstance(adapter, LoadedAdapter)
        with host.batch([resident.digest, adapter]) as assignment:
            got = model_outputs(model, ids)[:, 4:]
        assert assignment.slots == (resident.slot, resident.slot)
    want = _single(family, {"lora4": [0, 1]}, ids)
    assert (got - want).abs().max().item() <= MAX_DIFF


def test_a_followed_name_moves_while_batches_in_flight_keep_their_adapter(
    families: dict[str, Family],
) -> None:
    """What a tag follower does on a move (`NameBinding.swap`): the new adapter is loaded
    into a slot and the name rebound; a batch that pinned the old one keeps it whole."""
    family = families["gpt2"]
    model = family.make()
    ids = _ids(1, seed=8)
    with MultiAdapterHost(model, family.config, slots=3) as host:
        binding = NameBinding(host, "bot")
        first = binding.swap(family.adapters["lora4"])
        assert first.previous is None
        assert host.bound("bot") == first.digest
        with host.batch(["bot"]) as pinned:
            before = model_outputs(model, ids)
            second = binding.swap(family.adapters["dora"])  # the tag moved
            assert second.previous == first.digest
            assert second.kind == "dora"
            assert (model_outputs(model, ids) - before).abs().max().item() <= MAX_DIFF
        with host.batch(["bot"]) as moved:
            after = model_outputs(model, ids)[:, 4:]
        assert pinned.digests == (first.digest,)
        assert moved.digests == (second.digest,)
    assert (after - _single(family, {"dora": [0]}, ids)).abs().max().item() <= MAX_DIFF
