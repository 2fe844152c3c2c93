"""`peftreg merge`: local, no server; one-line errors with a non-zero exit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result
from peft import LoraConfig

from client.cli.main import cli
from tests.adapters.tiny_models import tiny_gpt2, tiny_llama
from tests.merge.builders import (
    TOLERANCE,
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
    # transformers (with compressed-tensors) loads it and runs it.
    from transformers import AutoModelForCausalLM

    from tests.adapters.tiny_models import sample_ids

    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    with torch.no_grad():
        logits = model(input_ids=sample_ids()).logits
    assert logits.shape == (2, 12, 64)
    assert bool(torch.isfinite(logits).all())
