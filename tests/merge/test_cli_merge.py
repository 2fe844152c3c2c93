"""`peftreg merge`: local, no server; one-line errors with a non-zero exit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result
from peft import LoraConfig

from peftreg.cli.main import cli
from peftreg.quantize import dequantize, unpack_int4
from tests.adapters.tiny_models import tiny_gpt2, tiny_llama
from tests.merge.builders import (
    TOLERANCE,
    assert_aligned,
    directory_tensors,
    max_difference,
    peft_merged,
    save_adapter,
    save_base,
)


def _run(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), env={"PEFTREG_URL": "http://127.0.0.1:9"})


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("cli")
    base = save_base(tiny_llama(), root / "base")
    first = save_adapter(
        tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]), root / "a", 1
    )
    second = save_adapter(
        tiny_llama(), LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"]), root / "b", 2
    )
    return base, first, second


def test_merge_command_writes_the_merged_checkpoint(
    setup: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    base, first, second = setup
    out = tmp_path / "out"
    result = _run(
        "merge",
        str(first),
        "--base",
        str(base),
        "-o",
        str(out),
        "--dtype",
        "bfloat16",
        "--device",
        "cpu",
        "--max-shard-size",
        "40KB",
        "--json",
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["device"] == "cpu"
    assert report["merged_modules"] == 2
    assert report["recipe"]["dtype"] == "bfloat16"
    assert len(report["shards"]) > 1  # 40 KB shards of a 90 KB model
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    want = peft_merged(tiny_llama(), first).state_dict()
    got = directory_tensors(out)
    assert max_difference(got, {k: v.to(torch.bfloat16) for k, v in want.items()}) == 0.0

    summed = tmp_path / "summed"
    result = _run(
        "merge",
        str(first),
        str(second),
        "--base",
        str(base),
        "-o",
        str(summed),
        "--weight",
        "0.5",
        "--weight",
        "0.5",
        "-q",
    )
    assert result.exit_code == 0, result.output
    assert "merged 2 adapter(s), 2 modules" in result.stdout
    original = tiny_llama().state_dict()
    half = {
        k: original[k]
        + 0.5 * (peft_merged(tiny_llama(), first).state_dict()[k] - original[k])
        + 0.5 * (peft_merged(tiny_llama(), second).state_dict()[k] - original[k])
        for k in original
    }
    assert max_difference(directory_tensors(summed), half) <= TOLERANCE


def test_merge_command_errors(setup: tuple[Path, Path, Path], tmp_path: Path) -> None:
    base, first, second = setup
    out = tmp_path / "out"
    weights = _run(
        "merge", str(first), str(second), "--base", str(base), "-o", str(out), "--weight", "1"
    )
    assert weights.exit_code == 2
    assert "1 --weight values for 2 adapters" in weights.stderr

    gpt2 = save_adapter(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn"]), tmp_path / "g")
    wrong = _run("merge", str(gpt2), "--base", str(base), "-o", str(out))
    assert wrong.exit_code == 1
    lines = wrong.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("peftreg: ")
    assert "no tensor transformer.h.0.attn.c_attn.weight" in lines[0]
    assert not out.exists()

    out.mkdir()
    (out / "keep.txt").write_text("x")
    busy = _run("merge", str(first), "--base", str(base), "-o", str(out))
    assert busy.exit_code == 1
    assert "not empty; pass --force" in busy.stderr
    forced = _run("merge", str(first), "--base", str(base), "-o", str(out), "--force", "-q")
    assert forced.exit_code == 0, forced.output
    assert not (out / "keep.txt").exists()
    assert (out / "model.safetensors").is_file()

    size = _run(
        "merge", str(first), "--base", str(base), "-o", str(out), "--max-shard-size", "lots"
    )
    assert size.exit_code == 2
    assert "not a size" in size.stderr


def test_merge_command_int4(setup: tuple[Path, Path, Path], tmp_path: Path) -> None:
    base, first, _ = setup
    out = tmp_path / "int4"
    result = _run(
        "merge", str(first), "--base", str(base), "-o", str(out), "--quantize", "int4",
        "--group-size", "32", "-q",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized"
    tensors = directory_tensors(out)
    assert tensors["model.layers.0.self_attn.q_proj.weight_packed"].dtype == torch.int32
    assert "model.layers.0.self_attn.q_proj.weight" not in tensors
    assert "lm_head.weight" in tensors  # not quantized
    assert_aligned(out)
    # transformers (with compressed-tensors) loads it and runs it (decompressing it): each
    # Linear's weight is then exactly the dequantized codes, and those are within half a
    # step of peft's merged weight.
    from transformers import AutoModelForCausalLM

    from tests.adapters.tiny_models import sample_ids

    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    with torch.no_grad():
        logits = model(input_ids=sample_ids()).logits
    assert logits.shape == (2, 12, 64)
    assert bool(torch.isfinite(logits).all())
    loaded = dict(model.named_modules())
    merged = peft_merged(tiny_llama(), first).state_dict()
    original = tiny_llama().state_dict()
    modules = [n.removesuffix(".weight_packed") for n in tensors if n.endswith(".weight_packed")]
    assert len(modules) == 14
    for module in modules:
        shape = tuple(tensors[f"{module}.weight_shape"].tolist())
        scale = tensors[f"{module}.weight_scale"]
        decoded = dequantize(unpack_int4(tensors[f"{module}.weight_packed"], shape[1]), scale, 32)
        assert torch.equal(loaded[module].weight, decoded), module
        step = scale.float().repeat_interleave(32, dim=1)
        error = (decoded - merged[f"{module}.weight"]).abs()
        assert bool((error <= 0.5 * step + 1e-6).all()), module
    q_proj = "model.layers.0.self_attn.q_proj"
    step = tensors[f"{q_proj}.weight_scale"].float().repeat_interleave(32, dim=1)
    unmerged = (loaded[q_proj].weight - original[f"{q_proj}.weight"]).abs()
    assert bool((unmerged > 0.5 * step + 1e-6).any())  # the adapter's delta is in the codes


@pytest.mark.parametrize("weight", ["nan", "inf", "-inf"])
def test_merge_command_refuses_a_weight_that_is_not_finite(
    setup: tuple[Path, Path, Path], tmp_path: Path, weight: str
) -> None:
    base, first, _ = setup
    result = _run(
        "merge", str(first), "--base", str(base), "-o", str(tmp_path / "out"), "--weight", weight
    )
    assert result.exit_code == 2
    assert "--weight" in result.stderr
    assert "is not a finite number" in result.stderr
    assert not (tmp_path / "out").exists()


def test_merge_command_restores_the_thread_count(
    setup: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    base, first, _ = setup
    threads = torch.get_num_threads()
    result = _run("merge", str(first), "--base", str(base), "-o", str(tmp_path / "o"), "-q")
    assert result.exit_code == 0, result.output
    assert torch.get_num_threads() == threads


def test_default_shard_size_is_the_library_default() -> None:
    from peftreg.checkpoint.writer import DEFAULT_MAX_SHARD_BYTES
    from peftreg.cli.merge import merge, parse_size

    option = next(p for p in merge.params if p.name == "max_shard_size")
    assert parse_size(str(option.default)) == DEFAULT_MAX_SHARD_BYTES == 5 * 10**9
