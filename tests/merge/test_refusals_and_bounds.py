"""What merge refuses before any work, cancellation, and the one-tensor memory bound."""

from __future__ import annotations

import json
import shutil
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PromptTuningConfig
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from peftreg.adapters.base_package import build_base_config
from peftreg.adapters.schema import BaseReference
from peftreg.merge import (
    AdapterInput,
    IncompatibleBase,
    MergeCancelled,
    MergeError,
    adapter_from_peft_directory,
    adapter_from_snapshot,
    merge_to_directory,
)
from peftreg.merge.base_checkpoint import BaseCheckpoint, BaseTensor
from peftreg.merge.compat import UNMERGEABLE_FEATURES
from peftreg.merge.model_dir import read_model_config
from peftreg.merge.stream import merge_to_directory as merge_from_reader
from peftreg.quantize import Int4Encoder
from tests.adapters.tiny_models import tiny_gpt2, tiny_llama
from tests.merge.builders import directory_tensors, peft_merged, save_adapter, save_base

OTHER = "sha256:" + "0" * 64


def _with_base(adapter: AdapterInput, **fields: str) -> AdapterInput:
    base = BaseReference(**fields)  # type: ignore[arg-type]
    config = adapter.config.model_copy(update={"base": base})
    return AdapterInput(config, adapter.tensors_path, adapter.weight, label=adapter.label)


def _with_peft_config(adapter: AdapterInput, **settings: Any) -> AdapterInput:
    peft_config = {**adapter.config.peft_config, **settings}
    config = adapter.config.model_copy(update={"peft_config": peft_config})
    return AdapterInput(config, adapter.tensors_path, adapter.weight, label=adapter.label)


class CountingCheckpoint(BaseCheckpoint):
    """Records every read, and how many earlier tensors were still alive at each read."""

    def __init__(self, directory: Path, chunk_bytes: int) -> None:
        super().__init__(directory, chunk_bytes=chunk_bytes)
        self.handed_out: list[weakref.ref[torch.Tensor]] = []
        self.alive_at_read: list[int] = []
        self.whole: list[BaseTensor] = []
        self.chunked: list[BaseTensor] = []

    def read(self, tensor: BaseTensor) -> torch.Tensor:
        self.alive_at_read.append(sum(ref() is not None for ref in self.handed_out))
        self.whole.append(tensor)
        value = super().read(tensor)
        self.handed_out.append(weakref.ref(value))
        return value

    def chunks(self, tensor: BaseTensor):  # type: ignore[no-untyped-def]
        self.alive_at_read.append(sum(ref() is not None for ref in self.handed_out))
        self.chunked.append(tensor)
        return super().chunks(tensor)


@pytest.fixture(scope="module")
def llama_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_base(tiny_llama(), tmp_path_factory.mktemp("llama") / "base")


@pytest.fixture(scope="module")
def lora(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    return save_adapter(tiny_llama(), config, tmp_path_factory.mktemp("lora") / "adapter")


def test_fingerprint_mismatch_is_refused_before_any_work(
    llama_base: Path, lora: Path, tmp_path: Path
) -> None:
    actual = build_base_config(llama_base).fingerprint
    adapter = _with_base(adapter_from_peft_directory(lora, label="acme/bot:v1"), fingerprint=OTHER)
    output = tmp_path / "out"
    with CountingCheckpoint(llama_base, 4096) as checkpoint:
        with pytest.raises(IncompatibleBase) as caught:
            merge_from_reader(checkpoint, [adapter], output)
        assert checkpoint.bytes_read == 0
        assert checkpoint.whole == []
    message = str(caught.value)
    assert OTHER in message
    assert actual in message
    assert "acme/bot:v1" in message
    assert list(tmp_path.iterdir()) == []  # no output, no staging directory

    # The right fingerprint merges, and the recipe records it.
    matching = _with_base(adapter_from_peft_directory(lora), fingerprint=actual)
    result = merge_to_directory(llama_base, [matching], output)
    assert result.recipe["base"]["fingerprint"] == actual


def test_structure_hash_and_shape_mismatches_are_refused(
    llama_base: Path, lora: Path, tmp_path: Path
) -> None:
    structure = build_base_config(llama_base).structure_hash
    wrong = _with_base(adapter_from_peft_directory(lora), structure_hash=OTHER)
    with pytest.raises(IncompatibleBase) as caught:
        merge_to_directory(llama_base, [wrong], tmp_path / "out")
    assert OTHER in str(caught.value)
    assert structure in str(caught.value)

    torch.manual_seed(0)
    wider = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    other = save_adapter(wider, LoraConfig(r=2, target_modules=["down_proj"]), tmp_path / "wider")
    with pytest.raises(IncompatibleBase, match=r"has shape \[32, 64\].*make \[32, 48\]"):
        merge_to_directory(llama_base, [adapter_from_peft_directory(other)], tmp_path / "out")

    gpt2 = save_adapter(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn"]), tmp_path / "g")
    with pytest.raises(IncompatibleBase, match=r"no tensor transformer\.h\.0\.attn\.c_attn"):
        merge_to_directory(llama_base, [adapter_from_peft_directory(gpt2)], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_kinds_and_mixes_that_cannot_merge(llama_base: Path, lora: Path, tmp_path: Path) -> None:
    prompt = save_adapter(
        tiny_llama(),
        PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
        tmp_path / "prompt",
    )
    with pytest.raises(MergeError, match=r"prompt_tuning adapter.*nothing to merge"):
        merge_to_directory(llama_base, [adapter_from_peft_directory(prompt)], tmp_path / "out")

    dora = save_adapter(
        tiny_llama(),
        LoraConfig(r=2, target_modules=["q_proj"], use_dora=True),
        tmp_path / "dora",
    )
    with pytest.raises(MergeError, match=r"DoRA adapter.*not in a weighted sum"):
        merge_to_directory(
            llama_base,
            [adapter_from_peft_directory(dora), adapter_from_peft_directory(lora)],
            tmp_path / "out",
        )
    with pytest.raises(MergeError, match="DoRA"):
        merge_to_directory(
            llama_base, [adapter_from_peft_directory(dora, weight=0.5)], tmp_path / "out"
        )

    first = _with_base(adapter_from_peft_directory(lora, label="one"), fingerprint=OTHER)
    second = _with_base(
        adapter_from_peft_directory(lora, label="two"), fingerprint="sha256:" + "1" * 64
    )
    with pytest.raises(IncompatibleBase, match="trained on different bases") as caught:
        merge_to_directory(llama_base, [first, second], tmp_path / "out")
    assert OTHER in str(caught.value)
    with pytest.raises(MergeError, match="no adapters"):
        merge_to_directory(llama_base, [], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_tied_target_and_quantized_base_are_refused(tmp_path: Path) -> None:
    base = tiny_gpt2()
    base_dir = save_base(base, tmp_path / "gpt2")
    assert "lm_head.weight" not in directory_tensors(base_dir)  # tied: stored as wte
    tied = save_adapter(base, LoraConfig(r=2, target_modules=["lm_head"]), tmp_path / "tied")
    with pytest.raises(IncompatibleBase, match=r"no tensor lm_head\.weight.*ties its output"):
        merge_to_directory(base_dir, [adapter_from_peft_directory(tied)], tmp_path / "out")

    config = json.loads((base_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes"}
    (base_dir / "config.json").write_text(json.dumps(config))
    ok = save_adapter(
        base, LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True), tmp_path / "ok"
    )
    with pytest.raises(MergeError, match="already quantized"):
        merge_to_directory(base_dir, [adapter_from_peft_directory(ok)], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cancellation_leaves_nothing(llama_base: Path, lora: Path, tmp_path: Path) -> None:
    polls: list[float] = []
    progress: list[float] = []

    def cancelled() -> bool:
        polls.append(1)
        return len(polls) > 5

    with pytest.raises(MergeCancelled, match="cancelled"):
        merge_to_directory(
            llama_base,
            [adapter_from_peft_directory(lora)],
            tmp_path / "out",
            cancelled=cancelled,
            progress=lambda fraction, _name: progress.append(fraction),
        )
    assert len(progress) == 5  # five tensors were done when the sixth poll said stop
    assert list(tmp_path.iterdir()) == []


def test_one_base_tensor_at_a_time(llama_base: Path, lora: Path, tmp_path: Path) -> None:
    with CountingCheckpoint(llama_base, chunk_bytes=4096) as checkpoint:
        progress: list[tuple[float, str]] = []
        merge_from_reader(
            checkpoint,
            [adapter_from_peft_directory(lora)],
            tmp_path / "out",
            progress=lambda fraction, name: progress.append((fraction, name)),
        )
        capacity = checkpoint.buffer_capacity
        total = sum(t.nbytes for t in checkpoint.tensors)
        # Every base tensor is read exactly once, and nothing else.
        assert checkpoint.bytes_read == total
        assert sorted(t.name for t in checkpoint.whole + checkpoint.chunked) == sorted(
            checkpoint.by_name
        )
        # Only the merged weights are read whole; the rest are copied in chunks.
        targets = {t.module for t in adapter_from_peft_directory(lora).config.targets}
        assert {t.name for t in checkpoint.whole} == {f"{m}.weight" for m in targets}
        # No tensor handed out earlier was still referenced when the next was read.
        assert set(checkpoint.alive_at_read) == {0}
        # Memory held by the reader: the largest tensor read whole plus one chunk.
        largest = max(t.nbytes for t in checkpoint.whole)
        assert capacity == largest + 4096
        assert capacity < total / 5
    assert [name for _, name in progress] == [t.name for t in checkpoint.tensors]
    assert progress[-1][0] == 1.0
    assert directory_tensors(tmp_path / "out").keys() == checkpoint.by_name.keys()
    want = peft_merged(tiny_llama(), lora).state_dict()
    got = directory_tensors(tmp_path / "out")
    assert all(torch.equal(got[k], want[k]) or (got[k] - want[k]).abs().max() <= 1e-6 for k in got)


def test_pulled_snapshot_input_and_qlora_note(llama_base: Path, lora: Path, tmp_path: Path) -> None:
    from peftreg.adapters.package import config_blob

    imported = adapter_from_peft_directory(lora)
    qlora = imported.config.model_copy(update={"base": BaseReference(quantization="nf4")})
    snapshot = tmp_path / "snapshot"  # a pulled artifact: its layers by title
    snapshot.mkdir()
    (snapshot / "adapter_model.safetensors").write_bytes(imported.tensors_path.read_bytes())
    adapter = adapter_from_snapshot(
        snapshot, config_blob(qlora), weight=1.0, digest="sha256:" + "a" * 64
    )
    assert adapter.name == "sha256:" + "a" * 64
    result = merge_to_directory(llama_base, [adapter], tmp_path / "out")
    assert result.recipe["adapters"] == [
        {"digest": "sha256:" + "a" * 64, "kind": "lora", "weight": 1.0}
    ]
    assert len(result.notes) == 1
    assert "NF4-quantized base (QLoRA)" in result.notes[0]
    want = peft_merged(tiny_llama(), lora).state_dict()
    got = directory_tensors(tmp_path / "out")
    assert all((got[k] - want[k]).abs().max().item() <= 1e-6 for k in got)
    with pytest.raises(MergeError, match=r"has no nola\.safetensors"):
        adapter_from_snapshot(snapshot, config_blob(qlora.model_copy(update={"kind": "nola"})))


def test_device_choice(llama_base: Path, lora: Path, tmp_path: Path) -> None:
    adapter = adapter_from_peft_directory(lora)
    if not torch.cuda.is_available():
        with pytest.raises(MergeError, match="CUDA is not available"):
            merge_to_directory(llama_base, [adapter], tmp_path / "out", device="cuda")
        assert not (tmp_path / "out").exists()
        assert merge_to_directory(llama_base, [adapter], tmp_path / "auto").device == "cpu"
        return
    result = merge_to_directory(llama_base, [adapter], tmp_path / "out", device="cuda")
    assert result.device.startswith("cuda")
    want = peft_merged(tiny_llama(), lora).state_dict()
    got = directory_tensors(tmp_path / "out")
    assert all((got[k] - want[k]).abs().max().item() <= 1e-6 for k in got)


def test_sharded_base_is_read_through_its_index(
    llama_base: Path, lora: Path, tmp_path: Path
) -> None:
    adapter = adapter_from_peft_directory(lora)
    # A sharded copy of the base (the merge of an adapter that changes nothing is the base).
    zero = tmp_path / "zero"
    zero.mkdir()
    tensors = load_file(str(lora / "adapter_model.safetensors"))
    save_file(
        {k: torch.zeros_like(v) if "lora_B" in k else v for k, v in tensors.items()},
        str(zero / "adapter_model.safetensors"),
    )
    (zero / "adapter_config.json").write_text((lora / "adapter_config.json").read_text())
    base = tmp_path / "sharded"
    merge_to_directory(
        llama_base, [adapter_from_peft_directory(zero)], base, max_shard_bytes=30_000
    )
    assert (base / "model.safetensors.index.json").is_file()
    assert directory_tensors(base).keys() == directory_tensors(llama_base).keys()
    # A stray safetensors file the index does not name is not part of the model.
    save_file(
        {"layers.0.attention.wq.weight": torch.ones(2)}, str(base / "consolidated.safetensors")
    )
    result = merge_to_directory(base, [adapter], tmp_path / "out")
    got = directory_tensors(tmp_path / "out")
    assert "layers.0.attention.wq.weight" not in got
    assert got.keys() == directory_tensors(llama_base).keys()
    assert result.merged_modules == 6
    with pytest.raises(MergeError, match="is the base directory itself"):
        merge_to_directory(base, [adapter], base, replace=True)
    assert (base / "consolidated.safetensors").is_file()


FEATURES = {
    "alora_invocation_tokens": [13, 7, 42],
    "use_qalora": True,
    "target_parameters": ["mlp.experts.gate_up_proj"],
    "layer_replication": [[0, 2], [1, 2]],
    "trainable_token_indices": [1, 2, 3],
}


@pytest.mark.parametrize("feature", list(FEATURES))
def test_peft_features_a_merge_would_get_wrong_are_refused(
    feature: str, llama_base: Path, lora: Path, tmp_path: Path
) -> None:
    assert set(FEATURES) == set(UNMERGEABLE_FEATURES)
    adapter = _with_peft_config(
        adapter_from_peft_directory(lora, label="acme/odd:v1"), **{feature: FEATURES[feature]}
    )
    with CountingCheckpoint(llama_base, 4096) as checkpoint:
        with pytest.raises(MergeError) as caught:
            merge_from_reader(checkpoint, [adapter], tmp_path / "out")
        assert checkpoint.bytes_read == 0
    message = str(caught.value)
    assert f"acme/odd:v1 sets {feature}" in message
    assert UNMERGEABLE_FEATURES[feature] in message
    assert list(tmp_path.iterdir()) == []
    # Unset (None, False, empty) is an ordinary adapter.
    unset = _with_peft_config(adapter_from_peft_directory(lora), **{feature: None})
    assert merge_to_directory(llama_base, [unset], tmp_path / "ok").merged_modules == 6


def test_outputs_over_around_or_inside_the_inputs_are_refused(
    llama_base: Path, lora: Path, tmp_path: Path
) -> None:
    models = tmp_path / "models"
    base = models / "tiny" / "base"
    shutil.copytree(llama_base, base)
    adapter_dir = tmp_path / "adapters" / "lora"
    shutil.copytree(lora, adapter_dir)
    (tmp_path / "link").symlink_to(models)
    adapter = adapter_from_peft_directory(adapter_dir)
    before = {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    refused = {
        base: "is the base directory itself",
        base.parent: "contains the base directory",
        models: "contains the base directory",
        tmp_path: "contains the base directory",
        tmp_path / "link": "contains the base directory",  # resolved through the symlink
        base / "merged": "is inside the base directory",
        adapter_dir: "is the directory of adapter",
        adapter_dir.parent: "contains the directory of adapter",
    }
    for output, reason in refused.items():
        with pytest.raises(MergeError, match=reason):
            merge_to_directory(base, [adapter], output, replace=True)
    after = {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    assert after == before  # nothing touched, nothing added
    # A sibling is fine, and may be replaced.
    merge_to_directory(base, [adapter], models / "tiny" / "merged")
    merge_to_directory(base, [adapter], models / "tiny" / "merged", replace=True)
    assert (base / "model.safetensors").read_bytes() == before[base / "model.safetensors"]


def test_int4_streams_the_tensors_it_stores_as_they_are(
    llama_base: Path, lora: Path, tmp_path: Path
) -> None:
    encoder = Int4Encoder.for_model_config(read_model_config(llama_base), group_size=16)
    with CountingCheckpoint(llama_base, chunk_bytes=4096) as checkpoint:
        merge_from_reader(
            checkpoint, [adapter_from_peft_directory(lora)], tmp_path / "out", encoder=encoder
        )
        quantized = {f"{module}.weight" for module in encoder.quantized_modules}
        assert len(quantized) == 14  # every Linear of the 2 layers; lm_head is ignored
        # Only the weights INT4 transforms are read whole; embeddings, lm_head and norms
        # are copied through in chunks.
        assert {t.name for t in checkpoint.whole} == quantized
        streamed = {t.name for t in checkpoint.chunked}
        assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= streamed
        assert streamed | quantized == set(checkpoint.by_name)
    got = directory_tensors(tmp_path / "out")
    base = directory_tensors(llama_base)
    for name in streamed:
        assert torch.equal(got[name], base[name]), name
