"""Run by `.venv-adapters/bin/python` (AdapterHub's `adapters` 1.3 on transformers 4.57),
never imported by the suite: it builds AdapterHub adapters with the real library and
computes the logits the peftreg side must reproduce.

    make_adapters.py JOB.json

JOB.json: {"base": DIR, "ids": [[int, ...], ...], "logits": FILE,
           "make": [{"name": str, "config": "lora" | "pfeiffer" | "houlsby" | "ia3",
                     "out": DIR, "pickle_out": DIR (optional)}],
           "load": [{"key": str, "dir": DIR}]}

The base directory (a tiny Llama saved by the suite with transformers 5) is loaded with
transformers 4.57. Every adapter of "make" is added with random non-zero weights (a fixed
seed) and saved with `model.save_adapter(out, name, use_safetensors=True)` (and, with
"pickle_out", also with the library's default, `pytorch_adapter.bin`); every
directory of "load" is loaded with `model.load_adapter(dir, use_safetensors=True)`. The
logits of the base ("base"), of each made adapter (its name) and of each loaded adapter
(its key) on the ids are written to FILE (safetensors).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import adapters
import torch
from adapters import DoubleSeqBnConfig, IA3Config, LoRAConfig, SeqBnConfig
from safetensors.torch import save_file
from transformers import LlamaForCausalLM

CONFIGS = {
    # Every LoRA place AdapterHub has on Llama: q, k, v, and the MLP (intermediate ->
    # down_proj, output -> up_proj in adapters' Llama wiring); alpha / r = 4.
    "lora": lambda: LoRAConfig(
        r=4, alpha=16, attn_matrices=["q", "k", "v"], intermediate_lora=True, output_lora=True
    ),
    # Pfeiffer: one bottleneck after the feed-forward block.
    "pfeiffer": lambda: SeqBnConfig(reduction_factor=4),
    # Houlsby: after attention and after the feed-forward block; none in layer 0.
    "houlsby": lambda: DoubleSeqBnConfig(reduction_factor=8, leave_out=[0]),
    # (IA)^3: AdapterHub's LoRA with composition_mode "scale".
    "ia3": IA3Config,
}


def _logits(model: LlamaForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.contiguous()


def main(job_path: str) -> None:
    job = json.loads(Path(job_path).read_text(encoding="utf-8"))
    ids = torch.tensor(job["ids"], dtype=torch.long)
    model = LlamaForCausalLM.from_pretrained(job["base"], torch_dtype=torch.float32).eval()
    adapters.init(model)
    out: dict[str, torch.Tensor] = {"base": _logits(model, ids)}
    generator = torch.Generator().manual_seed(11)
    for item in job.get("make", []):
        name = item["name"]
        model.add_adapter(name, config=CONFIGS[item["config"]]())
        with torch.no_grad():
            for key, param in model.named_parameters():
                if f".{name}." in key:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
        model.set_active_adapters(name)
        model.eval()
        out[name] = _logits(model, ids)
        model.save_adapter(item["out"], name, use_safetensors=True)
        if "pickle_out" in item:
            model.save_adapter(item["pickle_out"], name)
        model.set_active_adapters(None)
    for item in job.get("load", []):
        name = model.load_adapter(item["dir"], use_safetensors=True, load_as=item["key"])
        model.set_active_adapters(name)
        model.eval()
        out[item["key"]] = _logits(model, ids)
        model.set_active_adapters(None)
    save_file(out, job["logits"])


if __name__ == "__main__":
    main(sys.argv[1])
