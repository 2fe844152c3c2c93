"""The CUDA path of merge and INT4: runs where a GPU is present, skips elsewhere (issue 5).

Every CPU path is tested everywhere; these check that computing on CUDA gives
the CPU result (the same fp32 math on another device).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig

from peftreg.merge import adapter_from_peft_directory, merge_to_directory
from peftreg.merge.model_dir import read_model_config
from peftreg.quantize import Int4Encoder, quantize_groups, unpack_int4
from tests.adapters.tiny_models import tiny_llama
from tests.merge.builders import directory_tensors, max_difference, save_adapter, save_base

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_cuda_merge_and_int4_equal_the_cpu_result(tmp_path: Path) -> None:
    model = tiny_llama()
    base = save_base(model, tmp_path / "base")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    adapter = adapter_from_peft_directory(save_adapter(model, config, tmp_path / "adapter"))
    merge_to_directory(base, [adapter], tmp_path / "cpu", device="cpu")
    merge_to_directory(base, [adapter], tmp_path / "cuda", device="cuda")
    merged_cuda = directory_tensors(tmp_path / "cuda")
    assert max_difference(merged_cuda, directory_tensors(tmp_path / "cpu")) <= 1e-6

    encoder = Int4Encoder.for_model_config(read_model_config(base), group_size=16)
    merge_to_directory(base, [adapter], tmp_path / "cuda-int4", device="cuda", encoder=encoder)
    got = directory_tensors(tmp_path / "cuda-int4")
    modules = encoder.quantized_modules
    assert len(modules) == 14
    # INT4 of the same merged weights on the CPU: the scales must be equal, and only
    # rounding ties may give a code one step apart, in at most ~1e-4 of the codes.
    differing = 0
    total = 0
    for module in modules:
        weight = merged_cuda[f"{module}.weight"]
        q, scale = quantize_groups(weight, 16, "rtn", weight.dtype)
        assert torch.equal(got[f"{module}.weight_scale"], scale.to(weight.dtype)), module
        codes = unpack_int4(got[f"{module}.weight_packed"], weight.shape[1])
        gap = (codes.to(torch.int16) - q.to(torch.int16)).abs()
        assert int(gap.max()) <= 1, module
        differing += int((gap > 0).sum())
        total += gap.numel()
    assert differing <= max(1, round(1e-4 * total)), (differing, total)
