"""The streaming merge gives peft's merge_and_unload() weights (fp32, max abs diff <= 1e-6),
and its output directory loads in transformers with the same logits."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftConfig, PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, PreTrainedModel

from peftreg.adapters.peft_export import write_peft_directory
from peftreg.merge import adapter_from_peft_directory, compute, merge_to_directory
from peftreg.merge.nf4 import nf4_round_trip
from tests.adapters.test_nola import ALPHA, reference_checkpoint
from tests.adapters.tiny_models import same_weights, sample_ids, tiny_gpt2, tiny_llama
from tests.merge.builders import (
    TOLERANCE,
    directory_tensors,
    max_difference,
    peft_merged,
    save_adapter,
    save_base,
)

LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

CASES: dict[str, tuple[Callable[[], PreTrainedModel], Callable[[], PeftConfig]]] = {
    "lora": (
        tiny_llama,
        lambda: LoraConfig(r=4, lora_alpha=8, target_modules=[*LLAMA_LINEAR, "embed_tokens"]),
    ),
    "rslora_patterns": (
        tiny_llama,
        lambda: LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj", "down_proj"],
            use_rslora=True,
            rank_pattern={"layers.0.self_attn.q_proj": 2, "down_proj": 8},
            alpha_pattern={"v_proj": 16},
        ),
    ),
    "dora": (
        tiny_llama,
        lambda: LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "up_proj"], use_dora=True
        ),
    ),
    "dora_embedding": (
        tiny_llama,
        lambda: LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"], use_dora=True
        ),
    ),
    "modules_to_save": (
        tiny_llama,
        lambda: LoraConfig(
            r=2, lora_alpha=4, target_modules=["v_proj"], modules_to_save=["lm_head"]
        ),
    ),
    "gpt2_fan_in_fan_out": (
        tiny_gpt2,
        lambda: LoraConfig(
            r=4, lora_alpha=16, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True
        ),
    ),
    "gpt2_lora_bias": (
        tiny_gpt2,
        lambda: LoraConfig(
            r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, lora_bias=True
        ),
    ),
    "gpt2_dora": (
        tiny_gpt2,
        lambda: LoraConfig(
            r=4, lora_alpha=8, target_modules=["c_fc"], fan_in_fan_out=True, use_dora=True
        ),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_merge_equals_peft_merge_and_unload(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Blocks of 100 values: 3 rows of 32 at a time, so every weight is merged in several
    # row blocks (the last one short), as large weights are.
    monkeypatch.setattr(compute, "BLOCK_ELEMENTS", 100)
    make_model, make_config = CASES[case]
    base = make_model()
    base_dir = save_base(base, tmp_path / "base")
    adapter_dir = save_adapter(base, make_config(), tmp_path / "adapter")

    result = merge_to_directory(
        base_dir, [adapter_from_peft_directory(adapter_dir)], tmp_path / "out"
    )

    got = directory_tensors(tmp_path / "out")
    assert set(got) == set(directory_tensors(base_dir))
    want = peft_merged(base, adapter_dir).state_dict()
    assert max_difference(got, want) <= TOLERANCE
    original = base.state_dict()
    changed = {name for name in got if not torch.equal(got[name], original[name])}
    assert changed  # the adapter changed something, and the comparison saw it
    assert result.merged_modules > 0
    assert result.device == "cpu"
    assert all(got[name].dtype == torch.float32 for name in got)


def test_gpt2_tied_output_loads_with_the_same_logits(tmp_path: Path) -> None:
    base = tiny_gpt2()
    base_dir = save_base(base, tmp_path / "base")
    config = LoraConfig(
        r=4, lora_alpha=16, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True
    )
    adapter_dir = save_adapter(base, config, tmp_path / "adapter")
    merge_to_directory(base_dir, [adapter_from_peft_directory(adapter_dir)], tmp_path / "out")
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    reference = peft_merged(base, adapter_dir)
    ids = sample_ids()
    with torch.no_grad():
        got = loaded(input_ids=ids).logits
        want = reference(input_ids=ids).logits
        plain = base(input_ids=ids).logits
    assert (want - plain).abs().max().item() > 1e-3
    assert (got - want).abs().max().item() <= 1e-5


def test_nola_equals_peft_merge_of_its_materialized_lora(tmp_path: Path) -> None:
    from peftreg.adapters.nola import import_reference_checkpoint

    base = tiny_llama()
    base_dir = save_base(base, tmp_path / "base")
    config, nola_dir = import_reference_checkpoint(
        reference_checkpoint(tmp_path / "ref.safetensors", init_a=True),
        tmp_path / "nola",
        lora_alpha=ALPHA,
    )
    lora_dir = tmp_path / "lora"
    write_peft_directory(config, nola_dir / "nola.safetensors", lora_dir)

    result = merge_to_directory(base_dir, [adapter_from_peft_directory(nola_dir)], tmp_path / "out")

    got = directory_tensors(tmp_path / "out")
    want = peft_merged(base, lora_dir).state_dict()
    assert max_difference(got, want) <= TOLERANCE
    assert result.merged_modules == len(config.targets) == 4
    assert result.recipe["adapters"][0]["kind"] == "nola"


def test_weighted_sum_of_two_loras(tmp_path: Path) -> None:
    base = tiny_llama()
    base_dir = save_base(base, tmp_path / "base")
    first = save_adapter(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), tmp_path / "a", 1
    )
    second = save_adapter(
        base,
        LoraConfig(r=2, lora_alpha=4, target_modules=["v_proj", "down_proj"]),
        tmp_path / "b",
        2,
    )
    inputs = [
        adapter_from_peft_directory(first, weight=0.7),
        adapter_from_peft_directory(second, weight=-0.4),
    ]
    result = merge_to_directory(base_dir, inputs, tmp_path / "out")

    original = base.state_dict()
    delta_a = {k: v - original[k] for k, v in peft_merged(base, first).state_dict().items()}
    delta_b = {k: v - original[k] for k, v in peft_merged(base, second).state_dict().items()}
    want = {k: original[k] + 0.7 * delta_a[k] - 0.4 * delta_b[k] for k in original}
    got = directory_tensors(tmp_path / "out")
    assert max_difference(got, want) <= TOLERANCE
    both = "model.layers.1.self_attn.v_proj.weight"
    assert delta_a[both].abs().max() > 0
    assert delta_b[both].abs().max() > 0
    assert result.merged_modules == 6  # q, v, down in 2 layers
    assert [a["weight"] for a in result.recipe["adapters"]] == [0.7, -0.4]


def test_output_dtype_sharding_and_transformers_load(tmp_path: Path) -> None:
    base = tiny_llama()
    base_dir = save_base(base, tmp_path / "base")
    # A non-float tensor in the base passes through unchanged whatever the output dtype.
    shard = base_dir / "model.safetensors"
    tensors = load_file(str(shard))
    tensors["extra.position_ids"] = torch.arange(7, dtype=torch.int64)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    (base_dir / "tokenizer.json").write_text('{"version": "1.0"}')
    config = LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_LINEAR)
    adapter_dir = save_adapter(base, config, tmp_path / "adapter")
    inputs = [adapter_from_peft_directory(adapter_dir)]

    merge_to_directory(base_dir, inputs, tmp_path / "fp32", max_shard_bytes=40_000)
    fp32 = tmp_path / "fp32"
    index = json.loads((fp32 / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in fp32.glob("*.safetensors"))
    assert len(shards) >= 3
    assert sorted(set(index["weight_map"].values())) == shards
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
    assert (fp32 / "tokenizer.json").read_text() == '{"version": "1.0"}'
    assert (fp32 / "generation_config.json").is_file()

    reference = peft_merged(base, adapter_dir)
    loaded = AutoModelForCausalLM.from_pretrained(str(fp32)).eval()
    ids = sample_ids()
    with torch.no_grad():
        want = reference(input_ids=ids).logits
        got = loaded(input_ids=ids).logits
    assert (got - want).abs().max().item() <= 1e-5

    merged32 = directory_tensors(fp32)
    for dtype, label in ((torch.float16, "float16"), (torch.bfloat16, "bfloat16")):
        out = tmp_path / label
        result = merge_to_directory(base_dir, inputs, out, dtype=dtype)
        assert result.shards == ["model.safetensors"]
        got16 = directory_tensors(out)
        assert got16["extra.position_ids"].dtype == torch.int64
        assert torch.equal(got16["extra.position_ids"], torch.arange(7))
        for name, value in got16.items():
            if name != "extra.position_ids":
                assert value.dtype == dtype, name
                assert torch.equal(value, merged32[name].to(dtype)), name  # cast once from fp32
        document = json.loads((out / "config.json").read_text())
        assert document["dtype"] == label
        assert document["architectures"] == ["LlamaForCausalLM"]
        model16 = AutoModelForCausalLM.from_pretrained(str(out), dtype=dtype).eval()
        assert model16.model.layers[0].self_attn.q_proj.weight.dtype == dtype


def _nf4_base(model: PreTrainedModel) -> PreTrainedModel:
    """`model` with every Linear weight (not lm_head) replaced by its NF4 round trip."""
    fresh = same_weights(model)
    with torch.no_grad():
        for name, module in fresh.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                module.weight.copy_(nf4_round_trip(module.weight))
    return fresh


def test_qlora_merges_into_the_nf4_dequantized_base(tmp_path: Path) -> None:
    base = tiny_llama()
    base_dir = save_base(base, tmp_path / "base")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    adapter_dir = save_adapter(base, config, tmp_path / "adapter")
    inputs = [adapter_from_peft_directory(adapter_dir)]

    merge_to_directory(base_dir, inputs, tmp_path / "out", base_quantization="nf4")

    quantized = _nf4_base(base)
    merged = PeftModel.from_pretrained(same_weights(quantized), str(adapter_dir))
    want = merged.merge_and_unload().state_dict()
    got = directory_tensors(tmp_path / "out")
    assert max_difference(got, want) <= TOLERANCE
    original = base.state_dict()
    # Untargeted Linear weights are round-tripped too; embeddings, lm_head and norms are not.
    k_proj = "model.layers.0.self_attn.k_proj.weight"
    assert not torch.equal(got[k_proj], original[k_proj])
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert torch.equal(got[name], original[name]), name


def test_half_precision_base_merges_in_fp32_and_casts_once(tmp_path: Path) -> None:
    base16 = tiny_llama().half()
    base_dir = save_base(base16, tmp_path / "base")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"])
    adapter_dir = save_adapter(tiny_llama(), config, tmp_path / "adapter")
    inputs = [adapter_from_peft_directory(adapter_dir)]
    # The fp32 reference: peft's merge into the fp16 weights, upcast exactly.
    want = peft_merged(base16.float(), adapter_dir).state_dict()
    for dtype in (None, torch.bfloat16, torch.float32):
        out = tmp_path / str(dtype)
        merge_to_directory(base_dir, inputs, out, dtype=dtype)
        got = directory_tensors(out)
        for name, value in got.items():
            assert value.dtype == (dtype or torch.float16), name
            expected = want[name].to(value.dtype)
            if dtype == torch.float32:
                assert (value - expected).abs().max().item() <= TOLERANCE, name
            else:  # equal, or one rounding step apart where the fp32 sums differ by an ulp
                step = 2**-10 if value.dtype == torch.float16 else 2**-7
                assert torch.allclose(value.float(), expected.float(), rtol=step, atol=0), name
        q_proj = "model.layers.0.self_attn.q_proj.weight"
        assert not torch.equal(got[q_proj].float(), base16.state_dict()[q_proj].float())
    embed = "model.embed_tokens.weight"
    assert torch.equal(directory_tensors(tmp_path / "None")[embed], base16.state_dict()[embed])
