"""A tiny base and LoRA adapters pushed to a real registry, for job tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from peft import LoraConfig
from transformers import PreTrainedModel

from peftreg.adapters.base_package import push_base
from peftreg.sdk.client import Client
from tests.adapters.tiny_models import tiny_llama
from tests.merge.builders import save_adapter, save_base

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class Pushed:
    model: PreTrainedModel
    base_dir: Path
    adapter_dir: Path
    base_ref: str
    adapter_ref: str


def lora_dir(model: PreTrainedModel, directory: Path, seed: int = 7, rank: int = 4) -> Path:
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS)
    return save_adapter(model, config, directory, seed)


def push_base_and_adapter(
    client: Client, root: Path, *, repository: str = "acme/bot", seed: int = 0
) -> Pushed:
    model = tiny_llama(seed)
    base_dir = save_base(model, root / f"base-{seed}")
    adapter_dir = lora_dir(model, root / f"adapter-{seed}")
    base_ref = f"acme/base:seed{seed}"
    push_base(client, base_dir, base_ref)
    adapter_ref = f"{repository}:v{seed + 1}"
    client.push(adapter_dir, adapter_ref, base=client.base_reference(base_ref))
    return Pushed(model, base_dir, adapter_dir, base_ref, adapter_ref)
