"""End to end: an INT4 checkpoint written by Int4Encoder loads in transformers and runs.

Measured on the tiny random Llama of `tiny_int4` (2 x 16 tokens), logits of the
loaded INT4 model against the fp32 model, relative Frobenius / max-abs over
max |fp32 logit|: rtn g128 bf16 0.174 / 0.196, mse g64 fp32 0.156 / 0.169,
mse g32 fp16 tied 0.139 / 0.078. The documented bound
(also in client/quantize/encoder.py) is 0.25 / 0.30. It describes this tiny
random model, not real ones (whose 4-bit quality is a perplexity question);
the strict check is the other one: the loaded model equals the fp32 model with
each Linear replaced by `dequantize(q, scale)` (fake quantization), exactly
in fp32 (measured 0.0) and to the storage dtype's rounding otherwise
(measured relative Frobenius 6.3e-3 in bf16, 8.1e-4 in fp16).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from peftreg.quantize import Int4Encoder, dequantize, unpack_int4
from tests.quantize.tiny_int4 import tiny_llama, write_checkpoint

LOGIT_RELATIVE_FROBENIUS_BOUND = 0.25
LOGIT_MAX_ABS_BOUND = 0.30  # times max |fp32 logit|
FAKE_QUANT_TOLERANCE = {torch.float32: 1e-6, torch.bfloat16: 2e-2, torch.float16: 5e-3}

CASES = [
    pytest.param("rtn", 128, torch.bfloat16, False, ("lm_head",), id="rtn-g128-bf16"),
    pytest.param("mse", 64, torch.float32, False, ("lm_head",), id="mse-g64-fp32"),
    pytest.param("mse", 32, torch.float16, True, (), id="mse-g32-fp16-tied"),
]


def relative_frobenius(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want).norm() / want.norm())


@pytest.mark.parametrize(("algorithm", "group_size", "dtype", "tied", "ignore"), CASES)
def test_int4_checkpoint_loads_in_transformers_and_runs(
    tmp_path: Path,
    algorithm: str,
    group_size: int,
    dtype: torch.dtype,
    tied: bool,
    ignore: tuple[str, ...],
) -> None:
    model = tiny_llama(tie_word_embeddings=tied)
    encoder = Int4Encoder.for_model_config(
        model.config.to_dict(),
        group_size=group_size,
        algorithm=algorithm,  # type: ignore[arg-type]
        ignore=ignore,
    )
    written = write_checkpoint(tmp_path / "int4", model, encoder, dtype)
    quantized = encoder.quantized_modules
    assert len(quantized) == (12 if group_size == 128 else 14)

    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / "int4", output_loading_info=True)
    assert not info["missing_keys"]
    assert not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    assert loaded.dtype == dtype
    modules = dict(loaded.named_modules())
    for module in quantized:
        assert hasattr(modules[module], "weight_packed"), module

    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = loaded(ids).logits
        reference = model(ids).logits
    assert bool(torch.isfinite(logits).all())

    fake_quantized = copy.deepcopy(model)
    state = fake_quantized.state_dict()
    for module in quantized:
        columns = int(written[f"{module}.weight_shape"][1])
        q = unpack_int4(written[f"{module}.weight_packed"], columns)
        decoded = dequantize(q, written[f"{module}.weight_scale"], group_size)
        assert torch.equal(modules[module].weight, decoded.to(dtype)), module
        state[f"{module}.weight"] = decoded
    for name in ("model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight"):
        if name in written:
            assert torch.equal(loaded.state_dict()[name], written[name]), name
    fake_quantized.load_state_dict(state)
    with torch.no_grad():
        fake_logits = fake_quantized(ids).logits
    assert relative_frobenius(logits, fake_logits) <= FAKE_QUANT_TOLERANCE[dtype]

    scale = float(reference.abs().max())
    assert relative_frobenius(logits, reference) <= LOGIT_RELATIVE_FROBENIUS_BOUND
    assert float((logits.float() - reference).abs().max()) <= LOGIT_MAX_ABS_BOUND * scale
