"""The cases that used to give wrong numbers without a word, on tiny Llama and Qwen2 (GQA;
Qwen2 with q/k/v biases and tied embeddings): each is now exact or refused with the fix.

- PiSSA / OLoRA adapters saved without `path_initial_model_for_weight_conversion` are
  refused (push, merge, hot-swap load, and the registry's own check); converted, they are
  plain LoRA of rank 2r and merge as peft does.
- Prefix tuning on a GQA base: `token_dim` is the key/value width, as peft sets it.
- Merged hot-swap of an embedding LoRA on a tied-embedding base is refused at attach;
  unmerged mode gives peft's logits.
- LoRA with bias="all"/"lora_only" is pushed and verified; `layer_replication` is
  refused by name; `show` names the variant.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, PrefixTuningConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from peftreg import Client
from peftreg.adapters.peft_import import PeftImportError, read_peft_directory
from peftreg.adapters.validate import AdapterInvalid, validate_adapter
from peftreg.formats.safetensors_header import read_header
from peftreg.hotswap import AdapterHost, HostConfig, HostError, SwapError
from peftreg.merge import adapter_from_peft_directory, merge_to_directory
from tests.adapters.tiny_models import same_weights, sample_ids, tiny_llama, tiny_qwen2
from tests.fixtures.cli import CliEnv
from tests.merge.builders import TOLERANCE, directory_tensors, max_difference, peft_merged

MODELS: dict[str, Callable[[], PreTrainedModel]] = {"llama": tiny_llama, "qwen2": tiny_qwen2}
FIX = "path_initial_model_for_weight_conversion"


@pytest.fixture(scope="module")
def bases(module_cli: CliEnv, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each tiny model saved once and pushed as a base (`acme/bases/<model>:v1`)."""
    directories = {}
    for name, make in MODELS.items():
        directory = tmp_path_factory.mktemp(f"base-{name}")
        make().save_pretrained(str(directory), safe_serialization=True)
        pushed = module_cli.run("base", "push", str(directory), f"acme/bases/{name}:v1")
        assert pushed.exit_code == 0, pushed.output
        directories[name] = directory
    return directories


def _train(model: torch.nn.Module, seed: int = 7) -> None:
    """Stand-in for training: move every trainable adapter parameter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if (param.requires_grad and ("lora_" in name or "prompt_encoder" in name)) or (
                param.requires_grad and name.endswith("bias")
            ):
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)


def _pissa_like(make: Callable[[], PreTrainedModel], init: str, root: Path) -> tuple[Path, Path]:
    """(saved without conversion, saved with conversion) of one trained adapter."""
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=init
    )
    peft_model = get_peft_model(make(), config)  # rewrites the base weights to a residual
    peft_model.peft_config["default"].init_lora_weights = True
    peft_model.save_pretrained(str(root / "initial"))
    peft_model.peft_config["default"].init_lora_weights = init
    _train(peft_model)
    peft_model.save_pretrained(str(root / "unconverted"))
    peft_model.save_pretrained(
        str(root / "converted"), path_initial_model_for_weight_conversion=str(root / "initial")
    )
    return root / "unconverted", root / "converted"


def _pushed(module_cli: CliEnv, ref: str) -> bool:
    with Client(module_cli.env["PEFTREG_URL"]) as client:
        return ref.split(":", maxsplit=1)[0] in client.catalog()


@pytest.mark.parametrize(("model", "init"), [("llama", "pissa"), ("qwen2", "olora")])
def test_base_changing_init_without_conversion_is_refused_with_the_fix(
    model: str, init: str, module_cli: CliEnv, bases: dict[str, Path], tmp_path: Path
) -> None:
    unconverted, converted = _pissa_like(MODELS[model], init, tmp_path)
    assert json.loads((unconverted / "adapter_config.json").read_text())["init_lora_weights"] == (
        init
    )

    ref = f"acme/silent/{init}-{model}:raw"
    refused = module_cli.subprocess(
        "push", str(unconverted), ref, "--base", f"acme/bases/{model}:v1"
    )
    assert refused.returncode != 0
    assert f"init_lora_weights '{init}'" in refused.stderr
    assert FIX in refused.stderr
    assert "Traceback" not in refused.stderr
    assert not _pushed(module_cli, ref)
    with pytest.raises(PeftImportError, match=FIX):
        adapter_from_peft_directory(unconverted)  # peftreg merge / export
    with pytest.raises(SwapError, match=FIX):
        AdapterHost(MODELS[model](), HostConfig(targets=["q_proj", "v_proj"])).load(unconverted)

    # converted: plain LoRA of rank 2r, verified against the base, merged as peft merges it
    ref = f"acme/silent/{init}-{model}:converted"
    pushed = module_cli.run("push", str(converted), ref, "--base", f"acme/bases/{model}:v1", "-q")
    assert pushed.exit_code == 0, pushed.output
    with Client(module_cli.env["PEFTREG_URL"]) as client:
        detail = client.version(ref)
    assert detail.adapter is not None
    assert (detail.adapter.kind, detail.adapter.rank, detail.adapter.verified) == ("lora", 8, True)
    out = tmp_path / "merged"
    merge_to_directory(bases[model], [adapter_from_peft_directory(converted)], out)
    want = peft_merged(MODELS[model](), converted).state_dict()
    assert max_difference(directory_tensors(out), want) <= TOLERANCE


def test_the_registry_refuses_an_unconverted_pissa_config_itself(tmp_path: Path) -> None:
    """A client that skips the library's import check still cannot store it."""
    _unconverted, converted = _pissa_like(tiny_llama, "pissa", tmp_path)
    config = read_peft_directory(converted).config
    config.peft_config["init_lora_weights"] = "pissa_niter_4"
    tensors = converted / "adapter_model.safetensors"
    with tensors.open("rb") as stream:
        header = read_header(stream, tensors.stat().st_size)
    with pytest.raises(AdapterInvalid, match=FIX) as caught:
        validate_adapter(config, header, lambda _name: iter(()), None)
    assert caught.value.location == "adapter_config.json"


@pytest.mark.parametrize("model", list(MODELS))
def test_prefix_tuning_on_a_gqa_base(
    model: str, module_cli: CliEnv, bases: dict[str, Path]
) -> None:
    make = MODELS[model]
    root = bases[model].parent / f"prefix-{model}"
    peft_model = get_peft_model(
        make(), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    )
    _train(peft_model)
    peft_model.eval()
    peft_model.save_pretrained(str(root / "good"))
    saved = json.loads((root / "good" / "adapter_config.json").read_text())
    assert saved["token_dim"] == 16  # 2 key/value heads x head dim 8, not the hidden size 32

    ref = f"acme/silent/prefix-{model}:v1"
    pushed = module_cli.run(
        "push", str(root / "good"), ref, "--base", f"acme/bases/{model}:v1", "-q"
    )
    assert pushed.exit_code == 0, pushed.output
    out = root / "pulled"
    pulled = module_cli.run("pull", ref, "--format", "peft", "-o", str(out), "-q")
    assert pulled.exit_code == 0, pulled.output
    loaded = PeftModel.from_pretrained(make(), str(out)).eval()
    ids = sample_ids()
    with torch.no_grad():
        difference = (loaded(input_ids=ids).logits - peft_model(input_ids=ids).logits).abs()
    assert difference.max().item() <= 1e-6
    with Client(module_cli.env["PEFTREG_URL"]) as client:
        adapter = client.version(ref).adapter
    assert adapter is not None
    assert adapter.verified is True

    # the same prefix at the hidden size, as a GQA-unaware tool would write it
    (root / "wide").mkdir()
    wide = {**saved, "token_dim": 32, "encoder_hidden_size": 32}
    (root / "wide" / "adapter_config.json").write_text(json.dumps(wide))
    save_file(
        {"prompt_embeddings": torch.zeros(3, 2 * 2 * 32)},
        str(root / "wide" / "adapter_model.safetensors"),
        {"format": "pt"},
    )
    refused = module_cli.subprocess(
        "push", str(root / "wide"), f"acme/silent/prefix-{model}:wide", "--base",
        f"acme/bases/{model}:v1",
    )  # fmt: skip
    assert refused.returncode != 0
    assert "token_dim 32 does not match the key/value width 16" in refused.stderr


def _embedding_lora(root: Path) -> Path:
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])
    peft_model = get_peft_model(tiny_qwen2(), config)
    _train(peft_model)
    peft_model.save_pretrained(str(root / "embedding-lora"))
    return root / "embedding-lora"


def test_merged_hot_swap_refuses_a_tied_embedding_and_unmerged_is_exact(tmp_path: Path) -> None:
    adapter = _embedding_lora(tmp_path)
    model = tiny_qwen2()
    original = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    targets = ["embed_tokens", "q_proj"]
    with pytest.raises(HostError, match=r"lm_head\.weight.*mode='unmerged'"):
        AdapterHost(model, HostConfig(targets=targets, mode="merged"))
    assert all(torch.equal(original[k], v) for k, v in model.state_dict().items())

    loaded = PeftModel.from_pretrained(tiny_qwen2(), str(adapter)).eval()
    ids = sample_ids()
    with AdapterHost(model, HostConfig(targets=targets, max_rank=4)) as host:
        host.swap(adapter)
        with torch.no_grad():
            got = model(input_ids=ids).logits
            want = loaded(input_ids=ids).logits
    assert (got - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_lora_with_trained_biases_is_verified_and_round_trips(
    bias: str, module_cli: CliEnv, bases: dict[str, Path], tmp_path: Path
) -> None:
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], bias=bias)
    peft_model = get_peft_model(tiny_qwen2(), config)
    _train(peft_model)
    peft_model.eval()
    peft_model.save_pretrained(str(tmp_path / "src"))
    names = set(load_file(str(tmp_path / "src" / "adapter_model.safetensors")))
    assert "base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias" in names
    assert ("base_model.model.model.layers.0.self_attn.k_proj.bias" in names) == (bias == "all")

    ref = f"acme/silent/bias-{bias.replace('_', '-')}:v1"
    pushed = module_cli.run(
        "push", str(tmp_path / "src"), ref, "--base", "acme/bases/qwen2:v1", "-q"
    )
    assert pushed.exit_code == 0, pushed.output
    shown = module_cli.run("show", ref)
    assert f"kind:          lora (bias={bias})" in shown.output, shown.output
    pulled = module_cli.run("pull", ref, "--format", "peft", "-o", str(tmp_path / "out"), "-q")
    assert pulled.exit_code == 0, pulled.output
    loaded = PeftModel.from_pretrained(tiny_qwen2(), str(tmp_path / "out")).eval()
    ids = sample_ids()
    with torch.no_grad():
        difference = (loaded(input_ids=ids).logits - peft_model(input_ids=ids).logits).abs()
    assert difference.max().item() <= 1e-6


def test_layer_replication_is_refused_by_name(module_cli: CliEnv, tmp_path: Path) -> None:
    config = LoraConfig(r=4, target_modules=["q_proj"], layer_replication=[[0, 2], [1, 2]])
    get_peft_model(tiny_llama(), config).save_pretrained(str(tmp_path / "src"))
    refused = module_cli.subprocess("push", str(tmp_path / "src"), "acme/silent/replicated:v1")
    assert refused.returncode != 0
    assert "layer_replication duplicates base layers" in refused.stderr
    assert not _pushed(module_cli, "acme/silent/replicated:v1")


def test_show_names_the_variant(module_cli: CliEnv, tmp_path: Path) -> None:
    config = LoraConfig(
        r=4, target_modules=["q_proj"], use_rslora=True, alora_invocation_tokens=[3, 5]
    )
    peft_model = get_peft_model(same_weights(tiny_llama()), config)
    _train(peft_model)
    peft_model.save_pretrained(str(tmp_path / "src"))
    assert (
        module_cli.run("push", str(tmp_path / "src"), "acme/silent/alora:v1", "-q").exit_code == 0
    )
    shown = module_cli.run("show", "acme/silent/alora:v1")
    assert "kind:          lora (rsLoRA, aLoRA)" in shown.output, shown.output
