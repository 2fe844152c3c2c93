"""Adapters for the hot-swap tests, made with peft (and the NOLA importer) on tiny models."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from peft import LoraConfig, PeftConfig, PeftModel, PromptTuningConfig, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

from peftreg.adapters.nola import import_reference_checkpoint
from peftreg.adapters.peft_export import write_peft_directory
from peftreg.adapters.peft_import import read_peft_directory

ModelFactory = Callable[[], nn.Module]
MAX_DIFF = 1e-5


class TinyMLP(nn.Module):
    """A plain module (no transformers): 16 -> 32 -> 32 -> 8."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 32)
        self.out = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def mlp_input(seed: int = 1) -> torch.Tensor:
    return torch.randn(4, 16, generator=torch.Generator().manual_seed(seed))


def perturb(model: nn.Module, seed: int) -> None:
    """Make a fresh peft adapter non-trivial: random B (and embedding factors, magnitudes,
    IA3 vectors, soft prompts)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "lora_embedding" in name or "lora_A" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
            elif "lora_magnitude_vector" in name:
                param.mul_(1 + 0.1 * torch.randn(param.shape, generator=generator))
            elif "ia3_l" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.3)
            elif "prompt_embeddings" in name or "prompt_encoder" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)


def save_adapter(make_model: ModelFactory, config: PeftConfig, path: Path, seed: int = 7) -> Path:
    """A PEFT directory of `config` on a fresh model, with random non-zero weights."""
    peft_model = get_peft_model(make_model(), config)
    perturb(peft_model, seed)
    peft_model.save_pretrained(str(path), safe_serialization=True)
    return path


def peft_outputs(make_model: ModelFactory, path: Path, inputs: torch.Tensor) -> torch.Tensor:
    """What `peft.PeftModel` computes with the adapter at `path` (logits for transformers)."""
    model = PeftModel.from_pretrained(make_model(), str(path)).eval()
    with torch.no_grad():
        return model_outputs(model, inputs)


def model_outputs(model: nn.Module, inputs: torch.Tensor, **kwargs: object) -> torch.Tensor:
    with torch.no_grad():
        if inputs.dtype == torch.long:
            return model(input_ids=inputs, **kwargs).logits  # type: ignore[no-any-return]
        return model(inputs)  # type: ignore[no-any-return]


def lora(targets: list[str] | str, r: int = 4, **extra: object) -> LoraConfig:
    return LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, **extra)  # type: ignore[arg-type]


def prompt_tuning(tokens: int) -> PromptTuningConfig:
    return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=tokens)


def nola_adapter(
    make_model: ModelFactory, modules: list[str], path: Path, *, rank: int = 4, seed: int = 3
) -> tuple[Path, Path]:
    """A NOLA directory for `modules` of the model, and its materialized LoRA for peft."""
    model = make_model()
    shapes = {name: tuple(m.weight.shape) for name, m in model.named_modules() if name in modules}
    g = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for index, module in enumerate(modules):
        out_dim, in_dim = shapes[module]
        prefix = f"base_model.model.{module}"
        state[f"{prefix}.lora_A.weight"] = torch.empty(rank, in_dim).uniform_(
            -0.2, 0.2, generator=g
        )
        state[f"{prefix}.lora_B.weight"] = torch.zeros(out_dim, rank)
        state[f"{prefix}.lora_A.seed"] = torch.tensor([1_000_003 * (index + 1)], dtype=torch.int64)
        state[f"{prefix}.lora_B.seed"] = torch.tensor([77_777 + index], dtype=torch.int64)
        state[f"{prefix}.lora_A.coefficients"] = torch.randn(24, generator=g)
        state[f"{prefix}.lora_B.coefficients"] = torch.randn(16, generator=g)
    checkpoint = path.parent / f"{path.name}.reference.safetensors"
    save_file(state, str(checkpoint))
    config, directory = import_reference_checkpoint(
        checkpoint, path, lora_alpha=2.0 * rank, task_type=None
    )
    lora_dir = path.parent / f"{path.name}-as-lora"
    write_peft_directory(config, directory / "nola.safetensors", lora_dir, replace=False)
    return directory, lora_dir


def rewrite_tensors(
    source: Path, target: Path, change: Callable[[dict[str, torch.Tensor]], None]
) -> Path:
    """A copy of a PEFT directory whose tensors went through `change`."""
    target.mkdir(parents=True)
    name = (
        "nola.safetensors"
        if (source / "nola.safetensors").exists()
        else "adapter_model.safetensors"
    )
    tensors = load_file(str(source / name))
    change(tensors)
    save_file(tensors, str(target / name), metadata={"format": "pt"})
    config = json.loads((source / "adapter_config.json").read_text())
    (target / "adapter_config.json").write_text(json.dumps(config))
    return target


def record_nola_digest(directory: Path) -> None:
    """Write the factors digest into adapter_config.json, so a later tamper is caught on load."""
    config = read_peft_directory(directory).config
    assert config.nola is not None
    document = json.loads((directory / "adapter_config.json").read_text())
    document["factors_digest"] = config.nola.factors_digest
    (directory / "adapter_config.json").write_text(json.dumps(document))


def rewrite_config(source: Path, target: Path, change: Callable[[dict[str, object]], None]) -> Path:
    """A copy of a PEFT directory whose adapter_config.json went through `change`."""
    rewrite_tensors(source, target, lambda tensors: None)
    document = json.loads((target / "adapter_config.json").read_text())
    change(document)
    (target / "adapter_config.json").write_text(json.dumps(document))
    return target
