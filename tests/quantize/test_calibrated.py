"""GPTQ and AWQ through llm-compressor: the INT4 checkpoint loads in transformers and runs.

A tiny random Llama (hidden 128, intermediate 256, 2 layers, a byte-level BPE
tokenizer of 320 tokens trained in the test) calibrated on 4 windows of 32
tokens (AWQ; GPTQ 8 of 64) of real English text (Python's help topics). Logits of the loaded
checkpoint against the fp32 model on held-out text of the same corpus,
relative Frobenius / max-abs over max |fp32 logit| (8 windows of 64 tokens
measured 0.105 / 0.112 gptq g32, 0.150 / 0.166 awq g128; rtn 0.141 / 0.189
and 0.158 / 0.186): the bound is the one of `Int4Encoder`, 0.25 / 0.30.
GPTQ minimizes each layer's output error on the calibration text, so on text
like it its logits are closer than round-to-nearest's (checked); AWQ's
channel scaling pays off on the activation outliers of trained models, which
a random model lacks, so for it only the bound is checked here (its quality
is `make bench-quant`'s question).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer

from peftreg.cli.main import cli
from peftreg.formats.calibration import parse_calibration
from peftreg.quantize import Int4Encoder
from peftreg.quantize.calibrated import CalibrationSettings, quantize_calibrated
from tests.gguf.models import corpus
from tests.merge.builders import save_adapter
from tests.quantize.tiny_calibrated import tiny_llama_with_tokenizer
from tests.quantize.tiny_int4 import write_checkpoint

LOGIT_RELATIVE_FROBENIUS_BOUND = 0.25
LOGIT_MAX_ABS_BOUND = 0.30  # times max |fp32 logit|
# GPTQ needs enough tokens for a well-conditioned Hessian (4 x 32 made it no better than
# round-to-nearest); AWQ's grid search is the slow part, so it gets fewer.
GPTQ_SETTINGS = CalibrationSettings(samples=8, max_sequence_length=64)
AWQ_SETTINGS = CalibrationSettings(samples=4, max_sequence_length=32)


class Tiny:
    def __init__(self, root: Path) -> None:
        self.base = root / "base"
        self.model = tiny_llama_with_tokenizer(self.base)
        tokenizer = AutoTokenizer.from_pretrained(str(self.base))
        text = corpus(60_000)
        self.calibration = root / "calibration.txt"
        self.calibration.write_text(text[:40_000], encoding="utf-8")
        held_out = tokenizer(text[50_000:53_000])["input_ids"][:128]
        self.ids = torch.tensor([held_out[:64], held_out[64:128]])
        with torch.no_grad():
            self.logits = self.model(self.ids).logits

    def errors(self, directory: Path) -> tuple[float, float]:
        loaded = AutoModelForCausalLM.from_pretrained(str(directory)).eval()
        with torch.no_grad():
            got = loaded(self.ids).logits.float()
        assert bool(torch.isfinite(got).all())
        relative = float((got - self.logits).norm() / self.logits.norm())
        worst = float((got - self.logits).abs().max() / self.logits.abs().max())
        return relative, worst


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    return Tiny(tmp_path_factory.mktemp("calibrated"))


@pytest.mark.parametrize(
    ("algorithm", "group_size", "dtype", "settings"),
    [
        pytest.param("gptq", 32, torch.float16, GPTQ_SETTINGS, id="gptq-g32-fp16"),
        pytest.param("awq", 64, torch.float32, AWQ_SETTINGS, id="awq-g64-fp32"),
    ],
)
def test_calibrated_checkpoint_loads_in_transformers_close_to_fp32(
    tiny: Tiny,
    tmp_path: Path,
    algorithm: str,
    group_size: int,
    dtype: torch.dtype,
    settings: CalibrationSettings,
) -> None:
    base = tiny.base
    if dtype != torch.float32:
        base = tmp_path / "base"
        tiny.model.to(dtype).save_pretrained(str(base))
        tiny.model.float()
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (base / name).write_bytes((tiny.base / name).read_bytes())
    documents = parse_calibration(tiny.calibration.read_bytes(), tiny.calibration.name)
    output = tmp_path / "int4"
    result = quantize_calibrated(
        base,
        output,
        documents,
        algorithm=algorithm,
        group_size=group_size,
        settings=settings,
        calibration={"file": "calibration.txt", "file_digest": "sha256:recorded-as-given"},
    )
    assert result.output == output.absolute()
    windows = settings.samples
    assert (result.samples, result.tokens) == (windows, windows * settings.max_sequence_length)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".int4")]  # staged
    config = json.loads((output / "config.json").read_text())
    quantization = config["quantization_config"]
    assert quantization["format"] == "pack-quantized"
    weights = quantization["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["group_size"], weights["symmetric"]) == (
        4,
        group_size,
        True,
    )
    assert quantization["ignore"] == ["lm_head"]
    assert (output / "tokenizer.json").is_file()
    assert result.recipe["algorithm"] == algorithm
    assert result.recipe["calibration"] == {
        "file": "calibration.txt",
        "file_digest": "sha256:recorded-as-given",
        "samples": windows,
        "tokens": windows * settings.max_sequence_length,
        "max_sequence_length": settings.max_sequence_length,
        "seed": 0,
    }

    loaded, info = AutoModelForCausalLM.from_pretrained(str(output), output_loading_info=True)
    assert not info["missing_keys"]
    assert not info["unexpected_keys"]
    assert loaded.dtype == dtype
    modules = dict(loaded.named_modules())
    assert hasattr(modules["model.layers.0.mlp.down_proj"], "weight_packed")
    assert not hasattr(modules["lm_head"], "weight_packed")
    relative, worst = tiny.errors(output)
    assert relative < LOGIT_RELATIVE_FROBENIUS_BOUND
    assert worst < LOGIT_MAX_ABS_BOUND

    if algorithm == "gptq":  # closer than round-to-nearest at the same group size
        rtn = Int4Encoder.for_model_config(tiny.model.config.to_dict(), group_size=group_size)
        write_checkpoint(tmp_path / "rtn", tiny.model, rtn, dtype)
        rtn_relative, _ = tiny.errors(tmp_path / "rtn")
        assert relative < rtn_relative


def _run(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), env={"PEFTREG_URL": "http://127.0.0.1:9"})


def test_local_merge_with_gptq_and_its_refusals(tiny: Tiny, tmp_path: Path) -> None:
    adapter = save_adapter(
        tiny.model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]), tmp_path / "a", 3
    )
    common = ("merge", str(adapter), "--base", str(tiny.base), "--quantize", "int4")
    output = tmp_path / "out"

    missing = _run(*common, "-o", str(output), "--algorithm", "gptq")
    assert missing.exit_code == 2
    assert "needs --calibration" in missing.output
    stray = _run(*common, "-o", str(output), "--calibration", str(tiny.calibration))
    assert stray.exit_code == 2

    binary = tmp_path / "weights.bin"
    binary.write_bytes(b"\x00\x01\x02")
    no_text = tmp_path / "calib.jsonl"
    no_text.write_text('{"prompt": "no text field"}\n')
    for bad, cause in ((binary, "binary"), (no_text, 'no string "text"')):
        refused = _run(*common, "-o", str(output), "--algorithm", "gptq", "--calibration", str(bad))
        assert refused.exit_code == 1
        assert len(refused.output.strip().splitlines()) == 1
        assert cause in refused.output
        assert not output.exists()

    done = _run(
        *common,
        "-o",
        str(output),
        "--algorithm",
        "gptq",
        "--group-size",
        "64",
        "--calibration",
        str(tiny.calibration),
        "--calibration-samples",
        "4",
        "--max-sequence-length",
        "32",
        "--json",
    )
    assert done.exit_code == 0, done.output
    report = json.loads(done.stdout)
    encoding = report["recipe"]["encoding"]
    assert encoding["algorithm"] == "gptq"
    assert encoding["group_size"] == 64
    assert encoding["calibration"]["file"] == "calibration.txt"
    assert encoding["calibration"]["file_digest"].startswith("sha256:")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []
    loaded = AutoModelForCausalLM.from_pretrained(str(output)).eval()
    with torch.no_grad():
        assert bool(torch.isfinite(loaded(tiny.ids).logits).all())
