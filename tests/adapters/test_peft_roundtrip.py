"""PEFT directories pushed with the CLI and pulled back with --format peft load in peft
and give the same logits; the recorded AdapterConfig describes them."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import (
    LoraConfig,
    PeftConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptTuningConfig,
    get_peft_model,
)
from transformers import PreTrainedModel

from peftreg import Client
from peftreg.adapters.schema import ADAPTER_CONFIG_MEDIA_TYPE, SAFETENSORS_MEDIA_TYPE
from peftreg.manifest import ADAPTER_ARTIFACT, TITLE_ANNOTATION
from tests.adapters.tiny_models import same_weights, sample_ids, tiny_gpt2, tiny_llama
from tests.fixtures.cli import CliEnv


def _perturb(model: torch.nn.Module) -> None:
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name or "lora_embedding_A" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
            elif "lora_magnitude_vector" in name:
                param.mul_(1 + 0.1 * torch.randn(param.shape, generator=generator))


CASES: dict[str, tuple[Callable[[], PreTrainedModel], Callable[[], PeftConfig], dict[str, Any]]] = {
    "lora": (
        tiny_llama,
        lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"]),
        {"kind": "lora", "rank": 4, "scaling_rule": "alpha/r"},
    ),
    "rslora": (
        tiny_llama,
        lambda: LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj", "down_proj"],
            use_rslora=True,
            rank_pattern={"layers.0.self_attn.q_proj": 2, "down_proj": 8},
            alpha_pattern={"v_proj": 16},
        ),
        {"kind": "lora", "rank": 8, "scaling_rule": "alpha/sqrt(r)"},
    ),
    "lora_bias": (
        tiny_llama,
        lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj"], lora_bias=True),
        {"kind": "lora", "rank": 4},
    ),
    "dora": (
        tiny_llama,
        lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"], use_dora=True),
        {"kind": "dora", "rank": 4},
    ),
    "prompt_tuning": (
        tiny_llama,
        lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5),
        {"kind": "prompt_tuning", "rank": None, "num_virtual_tokens": 5, "targets": []},
    ),
    "prefix_tuning": (
        tiny_llama,
        lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
        {"kind": "prefix_tuning", "num_virtual_tokens": 3},
    ),
    "gpt2_fan_in_fan_out": (
        tiny_gpt2,
        lambda: LoraConfig(r=4, lora_alpha=16, target_modules=["c_attn"], fan_in_fan_out=True),
        {"kind": "lora", "rank": 4},
    ),
    "gpt2_rslora": (
        tiny_gpt2,
        lambda: LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["c_attn", "c_fc"],
            fan_in_fan_out=True,
            use_rslora=True,
            rank_pattern={"c_fc": 2},
        ),
        {"kind": "lora", "rank": 4, "scaling_rule": "alpha/sqrt(r)"},
    ),
    "gpt2_dora": (
        tiny_gpt2,
        lambda: LoraConfig(
            r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, use_dora=True
        ),
        {"kind": "dora", "rank": 4},
    ),
    "gpt2_prompt_tuning": (
        tiny_gpt2,
        lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
        {"kind": "prompt_tuning", "num_virtual_tokens": 4},
    ),
    "gpt2_prefix_tuning": (
        tiny_gpt2,
        lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2),
        {"kind": "prefix_tuning", "num_virtual_tokens": 2},
    ),
}

EXPECTED_TARGETS: dict[str, dict[str, tuple[str, int, float, float]]] = {
    "lora": {
        "model.embed_tokens": ("embedding", 4, 8.0, 2.0),
        "model.layers.1.self_attn.v_proj": ("linear", 4, 8.0, 2.0),
    },
    "rslora": {
        "model.layers.0.self_attn.q_proj": ("linear", 2, 8.0, 8.0 / 2**0.5),
        "model.layers.1.self_attn.q_proj": ("linear", 4, 8.0, 4.0),
        "model.layers.0.self_attn.v_proj": ("linear", 4, 16.0, 8.0),
        "model.layers.1.mlp.down_proj": ("linear", 8, 8.0, 8.0 / 8**0.5),
    },
    "gpt2_fan_in_fan_out": {"transformer.h.0.attn.c_attn": ("conv1d", 4, 16.0, 4.0)},
}


@pytest.mark.parametrize("case", list(CASES))
def test_push_pull_peft_roundtrip(case: str, cli: CliEnv, tmp_path: Path) -> None:
    make_model, make_config, expected = CASES[case]
    base = make_model()
    fresh = same_weights(base)
    peft_model = get_peft_model(base, make_config())
    _perturb(peft_model)
    peft_model.eval()
    source = tmp_path / "src"
    peft_model.save_pretrained(str(source), safe_serialization=True)
    assert (source / "adapter_model.safetensors").is_file()

    ref = f"acme/adapters/{case.replace('_', '-')}:v1"
    pushed = cli.run("push", str(source), ref, "-q")
    assert pushed.exit_code == 0, pushed.output
    out = tmp_path / "out"
    pulled = cli.run("pull", ref, "--format", "peft", "-o", str(out), "-q")
    assert pulled.exit_code == 0, pulled.output
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in source.iterdir())
    assert (out / "adapter_model.safetensors").read_bytes() == (
        source / "adapter_model.safetensors"
    ).read_bytes()

    loaded = PeftModel.from_pretrained(fresh, str(out)).eval()
    ids = sample_ids()
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
        got = loaded(input_ids=ids).logits
    assert want.dtype == torch.float32
    assert (want - got).abs().max().item() <= 1e-6

    with Client(cli.env["PEFTREG_URL"]) as client:
        detail = client.version(ref)
    manifest = detail.manifest
    assert manifest["artifactType"] == ADAPTER_ARTIFACT
    assert manifest["config"]["mediaType"] == ADAPTER_CONFIG_MEDIA_TYPE
    assert manifest["layers"][0]["mediaType"] == SAFETENSORS_MEDIA_TYPE
    assert manifest["layers"][0]["annotations"][TITLE_ANNOTATION] == "adapter_model.safetensors"
    assert manifest["annotations"]["io.peftreg.adapter.kind"] == expected["kind"]
    config = detail.config
    if isinstance(config, str):
        config = json.loads(config)
    assert isinstance(config, dict)
    for key, value in expected.items():
        assert config[key] == value, key
    saved_config = json.loads((source / "adapter_config.json").read_text())
    assert config["peft_config"] == saved_config
    if expected.get("rank") is not None:
        assert manifest["annotations"]["io.peftreg.adapter.rank"] == str(expected["rank"])
    targets = {t["module"]: t for t in config["targets"]}
    for module, (layer, rank, alpha, scaling) in EXPECTED_TARGETS.get(case, {}).items():
        target = targets[module]
        assert (target["layer"], target["rank"], target["alpha"]) == (layer, rank, alpha)
        assert target["scaling"] == pytest.approx(scaling)


def test_pickle_only_directory_is_refused(cli: CliEnv, tmp_path: Path) -> None:
    source = tmp_path / "pickled"
    source.mkdir()
    (source / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (source / "adapter_model.bin").write_bytes(os.urandom(256))  # never loaded
    result = cli.subprocess("push", str(source), "acme/adapters/pickled:v1")
    assert result.returncode != 0
    assert "adapter_model.bin is a pickle file and is never loaded" in result.stderr
    assert "safe_serialization=True" in result.stderr
    with Client(cli.env["PEFTREG_URL"]) as client:
        assert "acme/adapters/pickled" not in client.catalog()


def test_adapter_pushed_with_its_registered_base_is_verified(cli: CliEnv, tmp_path: Path) -> None:
    base = tiny_llama()
    base_dir = tmp_path / "base"
    base.save_pretrained(str(base_dir), safe_serialization=True)
    base_ref = "acme/bases/tiny-llama:v1"
    assert cli.run("base", "push", str(base_dir), base_ref).exit_code == 0

    adapter = get_peft_model(same_weights(base), LoraConfig(r=4, target_modules=["q_proj"]))
    _perturb(adapter)
    source = tmp_path / "qlora"
    adapter.save_pretrained(str(source), safe_serialization=True)
    ref = "acme/adapters/verified:v1"
    pushed = cli.run("push", str(source), ref, "--base", base_ref, "--base-quantization", "nf4")
    assert pushed.exit_code == 0, pushed.output

    with Client(cli.env["PEFTREG_URL"]) as client:
        detail = client.version(ref)
        base_fingerprint = client.base_reference(base_ref).fingerprint
    assert detail.adapter is not None
    assert detail.adapter.verified is True
    assert detail.adapter.base_fingerprint == base_fingerprint
    assert detail.adapter.base_quantization == "nf4"

    # a GPT-2 adapter claimed for the Llama base is refused, naming the module
    gpt2 = get_peft_model(
        tiny_gpt2(), LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True)
    )
    wrong = tmp_path / "wrong"
    gpt2.save_pretrained(str(wrong), safe_serialization=True)
    refused = cli.subprocess("push", str(wrong), "acme/adapters/wrong:v1", "--base", base_ref)
    assert refused.returncode != 0
    assert "transformer.h.0.attn.c_attn" in refused.stderr
    assert "Traceback" not in refused.stderr
