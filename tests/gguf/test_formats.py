"""GGUF encodings and refusals, without llama.cpp: K-quant blocks decoded by the `gguf`
package, Q/K permutation, the tensor-type mix, and bad requests refused with one line."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
from click.testing import CliRunner
from peft import LoraConfig

from peftreg.cli.main import cli
from peftreg.gguf.architecture import permute_rows
from peftreg.gguf.errors import GgufUnsupported
from peftreg.gguf.kquants import quantize_q4_k, quantize_q6_k
from peftreg.gguf.lora import write_gguf_lora
from peftreg.gguf.model import export_gguf
from peftreg.gguf.tensor_types import tensor_type, use_more_bits
from peftreg.merge.inputs import adapter_from_peft_directory
from tests.adapters.tiny_models import tiny_gpt2
from tests.gguf.models import tiny_llama_with_tokenizer
from tests.merge.builders import save_adapter, save_base

T = gguf.GGMLQuantizationType


@pytest.mark.parametrize(
    ("encode", "qtype", "limit"), [(quantize_q4_k, T.Q4_K, 0.09), (quantize_q6_k, T.Q6_K, 0.025)]
)
def test_k_quant_blocks_decode_with_the_gguf_package(encode, qtype, limit) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(0)
    values = (rng.standard_normal((16, 512)) * 0.05).astype(np.float32)
    values[3] = 0.0  # an all-zero block must decode to zeros
    values[5, :256] += 0.3  # a shifted block: Q4_K's min carries the offset
    encoded = encode(values)
    assert encoded.dtype == np.uint8
    assert encoded.shape == gguf.quant_shape_to_byte_shape(values.shape, qtype)
    decoded = gguf.quants.dequantize(encoded, qtype)
    assert np.all(decoded[3] == 0.0)
    error = np.sqrt(((decoded - values) ** 2).mean()) / values.std()
    assert error < limit
    # better than Q4_0 (llama.cpp's reference encoder, from the gguf package) at 4 bits
    if qtype == T.Q4_K:
        q4_0 = gguf.quants.dequantize(gguf.quants.quantize(values, T.Q4_0), T.Q4_0)
        assert error < np.sqrt(((q4_0 - values) ** 2).mean()) / values.std()


def test_permute_rows_interleaves_each_head_halves() -> None:
    rows = np.arange(8 * 3).reshape(8, 3)  # 2 heads of 4 rows
    permuted = permute_rows(rows, 2)
    assert permuted[:, 0].tolist() == [0, 6, 3, 9, 12, 18, 15, 21]


def test_tensor_types_follow_llama_quantize() -> None:
    assert tensor_type("blk.0.attn_norm.weight", (256,), "q4_k_m", 8) == T.F32
    assert tensor_type("output.weight", (320, 256), "q4_0", 8) == T.Q6_K
    assert tensor_type("blk.0.ffn_down.weight", (256, 512), "q4_k_m", 8) == T.Q6_K
    assert tensor_type("blk.1.ffn_down.weight", (256, 512), "q4_k_m", 8) == T.Q4_K
    assert tensor_type("blk.2.attn_v.weight", (256, 256), "q4_k_m", 8) == T.Q4_K
    assert tensor_type("blk.3.attn_v.weight", (256, 256), "q4_k_m", 8) == T.Q6_K
    assert tensor_type("blk.1.attn_q.weight", (64, 64), "q4_k_m", 8) == T.Q5_0  # 64 % 256
    assert tensor_type("output.weight", (320, 64), "q4_k_m", 8) == T.Q8_0
    assert tensor_type("blk.1.attn_q.weight", (48, 48), "q8_0", 8) == T.F16  # 48 % 32
    assert [use_more_bits(i, 8) for i in range(8)] == [1, 0, 0, 1, 0, 0, 1, 1]


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bases")
    gpt2 = tiny_gpt2()
    save_base(gpt2, root / "gpt2")
    save_adapter(gpt2, LoraConfig(r=2, target_modules=["c_attn"]), root / "gpt2-lora")
    llama = tiny_llama_with_tokenizer(root / "llama")
    config = LoraConfig(r=2, target_modules=["q_proj"], use_dora=True)
    save_adapter(llama, config, root / "llama-dora")
    return root


def test_merge_format_gguf_refuses_other_architectures(bases: Path, tmp_path: Path) -> None:
    output = tmp_path / "gpt2.gguf"
    result = CliRunner().invoke(
        cli,
        [
            "merge",
            str(bases / "gpt2-lora"),
            "--base",
            str(bases / "gpt2"),
            "--format",
            "gguf",
            "-o",
            str(output),
        ],
    )
    assert result.exit_code == 1
    assert "supports the architectures LlamaForCausalLM, Qwen2ForCausalLM" in result.output
    assert "GPT2LMHeadModel" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not output.exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--quantize", "q4_0"], "is a GGUF type: add --format gguf"),
        (["--format", "gguf", "--quantize", "int4"], "--format gguf takes --quantize"),
        (["--format", "gguf", "--dtype", "float16"], "not --dtype"),
    ],
)
def test_merge_refuses_mixed_format_options(
    bases: Path, tmp_path: Path, options: list[str], message: str
) -> None:
    result = CliRunner().invoke(
        cli,
        [
            "merge",
            str(bases / "llama-dora"),
            "--base",
            str(bases / "llama"),
            *options,
            "-o",
            str(tmp_path / "out"),
        ],
    )
    assert result.exit_code == 2
    assert message in result.output
    assert not (tmp_path / "out").exists()


def test_row_blocks_write_the_same_file_as_whole_tensors(bases: Path, tmp_path: Path) -> None:
    llama = tiny_llama_with_tokenizer(tmp_path / "base")
    adapter = save_adapter(
        llama, LoraConfig(r=2, target_modules=["q_proj", "k_proj", "down_proj"]), tmp_path / "lora"
    )
    inputs = [adapter_from_peft_directory(adapter)]
    whole = export_gguf(
        tmp_path / "base",
        inputs,
        tmp_path / "whole.gguf",
        quantization="f16",
        block_elements=1 << 30,
        name="tiny",
    )
    blocked = export_gguf(
        tmp_path / "base",
        inputs,
        tmp_path / "blocked.gguf",
        quantization="f16",
        block_elements=3000,
        name="tiny",
    )  # < 256 * 256
    assert whole.merged_modules == blocked.merged_modules == 6
    # the same tensors; values equal up to the last bit of fp16 (BLAS sums row blocks in
    # another order), so a block out of place or unpermuted would show
    a = {t.name: t for t in gguf.GGUFReader(tmp_path / "whole.gguf").tensors}
    b = {t.name: t for t in gguf.GGUFReader(tmp_path / "blocked.gguf").tensors}
    assert list(a) == list(b)
    for name, tensor in a.items():
        assert tensor.tensor_type == b[name].tensor_type
        np.testing.assert_allclose(
            np.asarray(b[name].data, dtype=np.float32),
            np.asarray(tensor.data, dtype=np.float32),
            rtol=2e-3,
            atol=1e-4,
        )


def test_gguf_lora_refuses_dora(bases: Path, tmp_path: Path) -> None:
    adapter = adapter_from_peft_directory(bases / "llama-dora")
    config = json.loads((bases / "llama" / "config.json").read_text())
    with pytest.raises(GgufUnsupported, match=r"dora adapter; llama\.cpp's --lora takes LoRA"):
        write_gguf_lora(adapter, config, tmp_path / "dora.gguf")
    assert not (tmp_path / "dora.gguf").exists()


def test_existing_gguf_output_is_kept_without_force(bases: Path, tmp_path: Path) -> None:
    output = tmp_path / "model.gguf"
    output.write_bytes(b"keep me")
    result = CliRunner().invoke(
        cli,
        [
            "merge",
            str(bases / "llama-dora"),
            "--base",
            str(bases / "llama"),
            "--format",
            "gguf",
            "-o",
            str(output),
        ],
    )
    assert result.exit_code == 1
    assert "exists; pass --force" in result.output
    assert output.read_bytes() == b"keep me"
