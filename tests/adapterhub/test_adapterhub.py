"""AdapterHub adapters made with the real `adapters` library (1.3 on transformers 4.57, in
.venv-adapters, driven as a subprocess by make_adapters.py): a LoRA pushed becomes a PEFT
LoRA whose logits in peft are AdapterHub's; bottleneck adapters (Pfeiffer, Houlsby) are
stored as kind "bottleneck", checked against the registered base, and `pull --format
adapterhub` writes directories AdapterHub loads with the same logits."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from peftreg import Client
from peftreg.adapters.schema import AdapterConfig
from peftreg.hotswap.adapter import adapter_from_pull
from peftreg.hotswap.errors import UnsupportedAdapter
from peftreg.merge import MergeError, adapter_from_snapshot, merge_to_directory
from tests.adapters.tiny_models import sample_ids, tiny_llama
from tests.fixtures.cli import CliEnv
from tests.fixtures.server import RegistryProcess

ROOT = Path(__file__).resolve().parents[2]
ADAPTERS_PYTHON = ROOT / ".venv-adapters" / "bin" / "python"
SCRIPT = Path(__file__).with_name("make_adapters.py")
BASE_REF = "acme/bases/llama:v1"
BOTTLENECKS = ("pfeiffer", "houlsby")
TOLERANCE = 1e-5


def run_adapters(job: dict[str, Any], workdir: Path) -> dict[str, torch.Tensor]:
    """Run make_adapters.py in AdapterHub's environment; the logits it wrote."""
    assert ADAPTERS_PYTHON.is_file(), "AdapterHub's environment is missing: make adapters-env"
    job_path = workdir / "job.json"
    job_path.write_text(json.dumps(job), encoding="utf-8")
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(workdir),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HOME": str(workdir / "hf"),
    }
    done = subprocess.run(
        [str(ADAPTERS_PYTHON), str(SCRIPT), str(job_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return load_file(job["logits"])


@dataclass(frozen=True)
class Made:
    base: Path
    dirs: dict[str, Path]  # adapter name -> directory saved with use_safetensors=True
    pickled: Path  # the LoRA saved with the library's default (pytorch_adapter.bin)
    logits: dict[str, torch.Tensor]  # "base" and each adapter, computed by AdapterHub


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Made:
    root = tmp_path_factory.mktemp("adapterhub")
    base = root / "base"
    tiny_llama().save_pretrained(str(base), safe_serialization=True)
    dirs = {name: root / name for name in ("lora", *BOTTLENECKS, "ia3")}
    make: list[dict[str, str]] = [
        {"name": name, "config": name, "out": str(path)} for name, path in dirs.items()
    ]
    make[0]["pickle_out"] = str(root / "lora-bin")
    job = {
        "base": str(base),
        "ids": sample_ids().tolist(),
        "logits": str(root / "logits.safetensors"),
        "make": make,
    }
    return Made(base, dirs, root / "lora-bin", run_adapters(job, root))


@pytest.fixture(scope="module")
def cli(server: RegistryProcess, tmp_path_factory: pytest.TempPathFactory) -> CliEnv:
    root = tmp_path_factory.mktemp("cli")
    return CliEnv.for_registry(server.url, root, PEFTREG_TOKEN="", PEFTREG_OFFLINE="")


@pytest.fixture(scope="module")
def pushed(made: Made, cli: CliEnv) -> dict[str, str]:
    """The base and the LoRA and bottleneck adapters, pushed against it: name -> ref."""
    result = cli.run("base", "push", str(made.base), BASE_REF)
    assert result.exit_code == 0, result.output
    refs = {}
    for name in ("lora", "ia3", *BOTTLENECKS):
        ref = f"acme/adapterhub/{name}:v1"
        result = cli.run("push", str(made.dirs[name]), ref, "--base", BASE_REF, "-q")
        assert result.exit_code == 0, result.output
        refs[name] = ref
    return refs


def old_lora_dir(made: Made) -> Path:
    """The LoRA (r 4, alpha 16) as if saved by adapters 1.0.1, whose loader uses alpha = r
    for such LoRAs (their scaling was faulty before 1.1.0)."""
    source = made.dirs["lora"].with_name("lora_1_0")
    if not source.exists():
        shutil.copytree(made.dirs["lora"], source)
        document = json.loads((source / "adapter_config.json").read_text())
        document["version"] = "adapters.1.0.1"
        (source / "adapter_config.json").write_text(json.dumps(document))
    return source


@pytest.fixture(scope="module")
def reloaded(
    pushed: dict[str, str], made: Made, cli: CliEnv, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, torch.Tensor]:
    """Each pushed adapter pulled with --format adapterhub and loaded back by AdapterHub:
    its logits, by name; and, as "lora_1_0", AdapterHub's logits for the LoRA claiming
    to be saved by adapters 1.0.1 (`old_lora_dir`)."""
    root = tmp_path_factory.mktemp("exported")
    load = [{"key": "lora_1_0", "dir": str(old_lora_dir(made))}]
    for name, ref in pushed.items():
        result = cli.run("pull", ref, "--format", "adapterhub", "-o", str(root / name), "-q")
        assert result.exit_code == 0, result.output
        # The static head save_adapter wrote (the base's lm_head) was not stored.
        assert sorted(p.name for p in (root / name).iterdir()) == [
            "adapter.safetensors",
            "adapter_config.json",
        ]
        load.append({"key": name, "dir": str(root / name)})
    job = {
        "base": str(made.base),
        "ids": sample_ids().tolist(),
        "logits": str(root / "logits.safetensors"),
        "load": load,
    }
    return run_adapters(job, root)


def _stored_config(cli: CliEnv, ref: str) -> AdapterConfig:
    with Client(cli.env["PEFTREG_URL"], cache=cli.cache) as client:
        result = client.pull(ref, None)
    assert result.adapter_config is not None
    return AdapterConfig.model_validate_json(result.adapter_config)


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=sample_ids()).logits  # type: ignore[no-any-return]


def test_the_base_gives_the_same_logits_in_both_transformers(made: Made) -> None:
    here = LlamaForCausalLM.from_pretrained(str(made.base), dtype=torch.float32).eval()
    assert (_logits(here) - made.logits["base"]).abs().max().item() <= TOLERANCE


def test_an_adapterhub_lora_is_a_peft_lora_with_adapterhubs_logits(
    made: Made, pushed: dict[str, str], cli: CliEnv, tmp_path: Path
) -> None:
    config = _stored_config(cli, pushed["lora"])
    shown = cli.run("show", pushed["lora"])
    assert "kind:          lora (from AdapterHub)" in shown.output, shown.output
    assert (config.kind, config.rank, config.alpha, config.scaling_rule) == (
        "lora",
        4,
        16.0,
        "alpha/r",
    )
    # attn_matrices q, k, v; intermediate_lora -> down_proj, output_lora -> up_proj.
    modules = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj")
    assert sorted(t.module for t in config.targets) == sorted(
        f"model.layers.{layer}.{module}" for layer in (0, 1) for module in (*modules, "mlp.up_proj")
    )
    assert {t.scaling for t in config.targets} == {4.0}
    with Client(cli.env["PEFTREG_URL"], cache=cli.cache) as client:
        assert client.version(pushed["lora"]).adapter.verified  # type: ignore[union-attr]

    result = cli.run("pull", pushed["lora"], "--format", "peft", "-o", str(tmp_path / "peft"))
    assert result.exit_code == 0, result.output
    base = LlamaForCausalLM.from_pretrained(str(made.base), dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
    got = _logits(model)
    assert (got - made.logits["lora"]).abs().max().item() <= TOLERANCE
    assert (got - made.logits["base"]).abs().max().item() > 1e-2  # the adapter does something


def test_a_lora_saved_before_adapters_1_1_imports_with_alpha_r_as_adapterhub_loads_it(
    made: Made, reloaded: dict[str, torch.Tensor], cli: CliEnv, tmp_path: Path
) -> None:
    ref = "acme/adapterhub/lora-1.0:v1"
    result = cli.run("push", str(old_lora_dir(made)), ref, "--base", BASE_REF, "-q")
    assert result.exit_code == 0, result.output
    config = _stored_config(cli, ref)
    assert (config.rank, config.alpha, {t.scaling for t in config.targets}) == (4, 4.0, {1.0})
    result = cli.run("pull", ref, "--format", "peft", "-o", str(tmp_path / "peft"))
    assert result.exit_code == 0, result.output
    base = LlamaForCausalLM.from_pretrained(str(made.base), dtype=torch.float32).eval()
    got = _logits(PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval())
    assert (got - reloaded["lora_1_0"]).abs().max().item() <= TOLERANCE
    assert (got - made.logits["lora"]).abs().max().item() > 1e-2  # not alpha 16's


@pytest.mark.parametrize("name", ["lora", "ia3", *BOTTLENECKS])
def test_pulled_as_adapterhub_it_loads_in_adapterhub_with_the_same_logits(
    name: str, made: Made, reloaded: dict[str, torch.Tensor]
) -> None:
    assert (reloaded[name] - made.logits[name]).abs().max().item() <= TOLERANCE
    assert (reloaded[name] - made.logits["base"]).abs().max().item() > 1e-2


def test_bottleneck_adapters_are_stored_typed_with_their_config(
    pushed: dict[str, str], cli: CliEnv
) -> None:
    pfeiffer = _stored_config(cli, pushed["pfeiffer"])
    houlsby = _stored_config(cli, pushed["houlsby"])
    assert (pfeiffer.kind, houlsby.kind) == ("bottleneck", "bottleneck")
    assert pfeiffer.bottleneck is not None
    assert houlsby.bottleneck is not None
    p, h = pfeiffer.bottleneck, houlsby.bottleneck
    assert (p.style, p.reduction_factor, p.non_linearity, p.mh_adapter, p.output_adapter) == (
        "pfeiffer",
        4,
        "relu",
        False,
        True,
    )
    assert (p.original_ln_before, p.layers, p.leave_out, p.hidden_size) == (True, [0, 1], [], 32)
    assert (h.style, h.reduction_factor, h.non_linearity, h.mh_adapter, h.output_adapter) == (
        "houlsby",
        8,
        "swish",
        True,
        True,
    )
    assert (h.original_ln_before, h.layers, h.leave_out) == (False, [1], [0])
    # Pfeiffer: one module per layer, (8, 32) down and (32, 8) up (32 / 4); Houlsby: two
    # in layer 1 only, (4, 32) down (32 / 8).
    shapes = {spec.name: spec.shape for spec in houlsby.tensors}
    assert len(shapes) == 8
    assert shapes["model.layers.1.attention_adapters.adapters.houlsby.adapter_down.0.weight"] == (
        4,
        32,
    )
    assert len(pfeiffer.tensors) == 8
    with Client(cli.env["PEFTREG_URL"], cache=cli.cache) as client:
        for name in BOTTLENECKS:
            detail = client.version(pushed[name]).adapter
            assert detail is not None
            assert (detail.kind, detail.verified) == ("bottleneck", True)
    page = httpx.get(f"{cli.env['PEFTREG_URL']}/ui/r/acme/adapterhub/houlsby/-/versions/v1")
    assert page.status_code == 200
    assert "bottleneck" in page.text
    shown = cli.run("show", pushed["houlsby"])
    assert shown.exit_code == 0, shown.output
    assert "bottleneck:    houlsby (AdapterHub), reduction factor 8, swish, " in shown.output, (
        shown.output
    )
    assert "mh_adapter+output_adapter, layers [1]" in shown.output


def test_a_bottleneck_adapter_that_does_not_fit_the_base_is_refused(
    made: Made, pushed: dict[str, str], cli: CliEnv, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    three_layers = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=False,
        )
    )
    three_layers.save_pretrained(str(tmp_path / "base3"), safe_serialization=True)
    result = cli.run("base", "push", str(tmp_path / "base3"), "acme/bases/llama3:v1")
    assert result.exit_code == 0, result.output
    result = cli.run(
        "push",
        str(made.dirs["pfeiffer"]),
        "acme/adapterhub/bad:v1",
        "--base",
        "acme/bases/llama3:v1",
    )
    assert result.exit_code != 0
    assert "layers [0, 1]" in result.output
    assert "needs [0, 1, 2]" in result.output


def test_a_bottleneck_directory_that_does_not_match_its_config_is_refused(
    made: Made, cli: CliEnv, tmp_path: Path
) -> None:
    source = tmp_path / "pfeiffer"
    shutil.copytree(made.dirs["pfeiffer"], source)
    document = json.loads((source / "adapter_config.json").read_text())
    document["config"]["reduction_factor"] = 8
    (source / "adapter_config.json").write_text(json.dumps(document))
    result = cli.run("push", str(source), "acme/adapterhub/mismatch:v1")
    assert result.exit_code != 0
    assert "pfeiffer.adapter_down.0.bias has shape [8]" in result.output
    assert "(hidden size 32, bottleneck 4) needs [4]" in result.output


def test_the_librarys_default_pickle_is_refused_with_the_fix(made: Made, cli: CliEnv) -> None:
    assert (made.pickled / "pytorch_adapter.bin").is_file()
    result = cli.run("push", str(made.pickled), "acme/adapterhub/pickled:v1")
    assert result.exit_code != 0
    assert "pytorch_adapter.bin is a pickle file and is never loaded" in result.output
    assert "use_safetensors=True" in result.output


def test_adapterhub_ia3_is_peft_ia3_with_adapterhubs_logits(
    made: Made, pushed: dict[str, str], cli: CliEnv, tmp_path: Path
) -> None:
    config = _stored_config(cli, pushed["ia3"])
    assert config.kind == "ia3"
    # IA3Config: k and v (selfattn_lora) and down_proj (intermediate_lora), outputs scaled.
    assert config.peft_config["feedforward_modules"] == []
    assert sorted(config.peft_config["target_modules"]) == sorted(
        f"model.layers.{layer}.{module}"
        for layer in (0, 1)
        for module in ("self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj")
    )
    result = cli.run("pull", pushed["ia3"], "--format", "peft", "-o", str(tmp_path / "peft"))
    assert result.exit_code == 0, result.output
    base = LlamaForCausalLM.from_pretrained(str(made.base), dtype=torch.float32).eval()
    got = _logits(PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval())
    assert (got - made.logits["ia3"]).abs().max().item() <= TOLERANCE
    assert (got - made.logits["base"]).abs().max().item() > 1e-2


@pytest.mark.parametrize(
    ("name", "change", "message"),
    [
        ("ia3", {"alpha": 2}, "with alpha 2 scales its vectors by alpha"),
        ("lora", {"use_dora": True}, "use_dora (AdapterHub's DoRA) is not imported"),
        ("lora", {"vera_d": 0.1}, "AdapterHub's VeRA, not a LoRA"),
        ("lora", {"use_gating": True}, "input-dependent gate"),
    ],
    ids=["ia3-alpha", "dora", "vera", "gating"],
)
def test_adapterhub_lora_variants_without_a_peft_form_are_refused(
    name: str, change: dict[str, Any], message: str, made: Made, cli: CliEnv, tmp_path: Path
) -> None:
    source = tmp_path / name
    shutil.copytree(made.dirs[name], source)
    document = json.loads((source / "adapter_config.json").read_text())
    document["config"].update(change)
    (source / "adapter_config.json").write_text(json.dumps(document))
    result = cli.run("push", str(source), "acme/adapterhub/refused:v1")
    assert result.exit_code != 0
    assert message in result.output


def test_a_bottleneck_adapter_has_no_peft_form_merge_or_hot_swap(
    made: Made, pushed: dict[str, str], cli: CliEnv, tmp_path: Path
) -> None:
    result = cli.run("pull", pushed["houlsby"], "--format", "peft", "-o", str(tmp_path / "p"))
    assert result.exit_code != 0
    assert "no PEFT form" in result.output
    assert "--format adapterhub" in result.output
    with Client(cli.env["PEFTREG_URL"], cache=cli.cache) as client:
        pulled = client.pull(pushed["houlsby"], None)
    assert pulled.adapter_config is not None
    with pytest.raises(MergeError, match="bottleneck adapter: it adds a module"):
        merge_to_directory(
            made.base, [adapter_from_snapshot(pulled.path, pulled.adapter_config)], tmp_path / "m"
        )
    with pytest.raises(UnsupportedAdapter, match="bottleneck adapter cannot be hot-swapped"):
        adapter_from_pull(pulled)
