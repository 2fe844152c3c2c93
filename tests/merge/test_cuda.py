"""The CUDA path of merge and INT4: runs where a GPU is present, skips elsewhere (issue 5).

Every CPU path is tested everywhere; these check that computing on CUDA gives
the CPU result (the same fp32 math on another device).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig

from client.merge import adapter_from_peft_directory, merge_to_directory
from client.merge.model_dir import read_model_config
from client.quantize import Int4Encoder
from tests.adapters.tiny_models import tiny_llama
from tests.merge.builders import directory_tensors, max_difference, save_adapter, save_base

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_cuda_merge_and_int4_equal_the_cpu_result(tmp_path: Path) -> None:
    model = tiny_llama()
    base = save_base(model, tmp_path / "base")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    adapter = adapter_from_peft_directory(save_adapter(model, config, tmp_path / "adapter"))
    results = {}
    for device in ("cpu", "cuda"):
        merge_to_directory(base, [adapter], tmp_path / device, device=device)
        encoder = Int4Encoder.for_model_config(read_model_config(base), group_size=16)
        merge_to_directory(
            base, [adapter], tmp_path / f"{device}-int4", device=device, encoder=encoder
        )
        results[device] = directory_tensors(tmp_path / device)
        results[f"{device}-int4"] = directory_tensors(tmp_path / f"{device}-int4")
    assert max_difference(results["cuda"], results["cpu"]) <= 1e-6
    packed = {k: v for k, v in results["cuda-int4"].items() if k.endswith("weight_packed")}
    assert packed
    mismatched = [k for k in packed if not torch.equal(packed[k], results["cpu-int4"][k])]
    # Rounding ties may differ between devices; nearly every code must agree.
    assert len(mismatched) <= len(packed) // 10
