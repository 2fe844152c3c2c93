"""GGUF files loaded and run by llama.cpp itself (node-llama-cpp's prebuilt CPU build).

One module-scoped build: a tiny Llama with a byte-level BPE tokenizer, an
rsLoRA adapter, the merged checkpoint (`peftreg merge`), the merged GGUF in
every type (`peftreg merge --format gguf`), the base as f16 GGUF and the
adapter as a GGUF LoRA; then one llama.cpp process runs them all.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

from peftreg.cli.main import cli
from peftreg.gguf.lora import write_gguf_lora
from peftreg.gguf.model import export_gguf
from peftreg.gguf.runtime import GgufRun, LoraFile
from peftreg.merge.inputs import adapter_from_peft_directory
from tests.gguf.models import (
    PROMPT,
    rslora_adapter,
    tiny_llama_with_tokenizer,
    tiny_qwen2_with_tokenizer,
)
from tests.gguf.runtime import llamacpp

QUANTIZED = ("q8_0", "q4_0", "q4_k_m")
COUNT = 8
TEXT = "Numbers like 1234567 and 3.14, symbols (a+b)*c; newlines\n\n  indented\ttabs."


@dataclass(frozen=True)
class Built:
    root: Path
    tokens: list[int]  # the prompt, by transformers' tokenizer
    text_tokens: list[int]
    expected: list[int]  # transformers' greedy continuation on the merged checkpoint
    expected_nll: float
    qwen2_expected: list[int]  # transformers' greedy continuation on the Qwen2 base
    answers: dict[str, list[dict[str, Any]]]


def _merge(*args: str) -> None:
    result = CliRunner().invoke(cli, ["merge", *args, "-q"])
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    root = tmp_path_factory.mktemp("gguf")
    model = tiny_llama_with_tokenizer(root / "base")
    adapter = rslora_adapter(model, root / "adapter")
    _merge(str(adapter), "--base", str(root / "base"), "-o", str(root / "merged"))
    for quantization in ("f16", "q4_k_m"):
        _merge(
            str(adapter),
            "--base",
            str(root / "base"),
            "--format",
            "gguf",
            "--quantize",
            quantization,
            "-o",
            str(root / f"merged-{quantization}.gguf"),
        )
    inputs = [adapter_from_peft_directory(adapter)]
    for quantization in ("q8_0", "q4_0"):
        export_gguf(
            root / "base", inputs, root / f"merged-{quantization}.gguf", quantization=quantization
        )
    export_gguf(root / "base", [], root / "base-f16.gguf", quantization="f16")
    config = json.loads((root / "base" / "config.json").read_text())
    write_gguf_lora(inputs[0], config, root / "adapter.gguf")

    tokenizer = AutoTokenizer.from_pretrained(root / "merged")
    merged = AutoModelForCausalLM.from_pretrained(root / "merged", dtype=torch.float32)
    tokens = tokenizer(PROMPT)["input_ids"]
    with torch.inference_mode():
        generated = merged.generate(
            torch.tensor([tokens]),
            max_new_tokens=COUNT,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
        logits = merged(torch.tensor([tokens])).logits[0, :-1]
        nll = torch.nn.functional.cross_entropy(logits, torch.tensor(tokens[1:]), reduction="sum")
    qwen2 = tiny_qwen2_with_tokenizer(root / "qwen2")
    export_gguf(root / "qwen2", [], root / "qwen2-f16.gguf", quantization="f16")
    with torch.inference_mode():
        qwen2_generated = qwen2.generate(
            torch.tensor([tokens]),
            max_new_tokens=COUNT,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    tasks = [
        {"kind": "tokenize", "text": TEXT},
        {"kind": "greedy", "tokens": tokens, "count": COUNT},
        {"kind": "nll", "tokens": tokens},
    ]
    runs = {f"merged-{q}": GgufRun(root / f"merged-{q}.gguf", tasks) for q in ("f16", *QUANTIZED)}
    runs["lora"] = GgufRun(root / "base-f16.gguf", tasks, [LoraFile(root / "adapter.gguf")])
    runs["qwen2"] = GgufRun(root / "qwen2-f16.gguf", tasks)
    answers = llamacpp().run_many(list(runs.values()))
    return Built(
        root,
        tokens,
        tokenizer(TEXT)["input_ids"],
        generated[0, len(tokens) :].tolist(),
        float(nll),
        qwen2_generated[0, len(tokens) :].tolist(),
        dict(zip(runs, answers, strict=True)),
    )


def _types(path: Path) -> set[str]:
    return {tensor.tensor_type.name for tensor in gguf.GGUFReader(path).tensors}


def test_llamacpp_tokenizes_as_transformers(built: Built) -> None:
    for answers in built.answers.values():
        assert answers[0]["tokens"] == built.text_tokens


def test_f16_greedy_tokens_equal_transformers_on_the_merged_checkpoint(built: Built) -> None:
    f16 = built.answers["merged-f16"]
    assert f16[1]["tokens"] == built.expected
    assert f16[2]["nll"] == pytest.approx(built.expected_nll, rel=2e-3)


def test_qwen2_f16_greedy_tokens_equal_transformers(built: Built) -> None:
    assert built.answers["qwen2"][1]["tokens"] == built.qwen2_expected
    assert _types(built.root / "qwen2-f16.gguf") == {"F16", "F32"}  # q/k/v biases in F32


def test_gguf_lora_on_the_base_equals_the_merged_gguf(built: Built) -> None:
    lora, merged = built.answers["lora"], built.answers["merged-f16"]
    assert lora[1]["tokens"] == merged[1]["tokens"] == built.expected
    assert lora[2]["nll"] == pytest.approx(merged[2]["nll"], rel=2e-3)
    reader = gguf.GGUFReader(built.root / "adapter.gguf")
    names = {tensor.name for tensor in reader.tensors}
    assert "blk.0.attn_q.weight.lora_a" in names
    assert "blk.1.ffn_down.weight.lora_b" in names
    assert bytes(reader.fields["adapter.type"].parts[-1]).decode() == "lora"


@pytest.mark.parametrize("quantization", QUANTIZED)
def test_quantized_files_load_and_generate(built: Built, quantization: str) -> None:
    answers = built.answers[f"merged-{quantization}"]
    generated = answers[1]["tokens"]
    assert len(generated) == COUNT
    assert all(0 <= token < 320 for token in generated)
    # The quantized model's loss stays near f16's: q8_0 within 1 %, 4-bit within 25 %.
    reference = built.answers["merged-f16"][2]["nll"]
    tolerance = 0.01 if quantization == "q8_0" else 0.25
    assert math.isfinite(answers[2]["nll"])
    assert answers[2]["nll"] == pytest.approx(reference, rel=tolerance)


def test_quantized_files_hold_llama_quantize_s_mix(built: Built) -> None:
    assert _types(built.root / "merged-f16.gguf") == {"F16", "F32"}
    assert _types(built.root / "merged-q8_0.gguf") == {"Q8_0", "F32"}
    assert _types(built.root / "merged-q4_0.gguf") == {"Q4_0", "Q6_K", "F32"}
    assert _types(built.root / "merged-q4_k_m.gguf") == {"Q4_K", "Q6_K", "F32"}
    sizes = {q: (built.root / f"merged-{q}.gguf").stat().st_size for q in ("f16", *QUANTIZED)}
    assert sizes["q4_k_m"] < sizes["q8_0"] < sizes["f16"]
