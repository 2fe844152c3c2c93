"""Tiny Llama models and a minimal checkpoint writer for the INT4 tests (nothing downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel

from peftreg.checkpoint.encoding import TensorEncoder


def tiny_llama(
    *, intermediate_size: int = 320, tie_word_embeddings: bool = False, seed: int = 0
) -> LlamaForCausalLM:
    """Hidden 128 (so groups of 64 and 128 apply), 2 layers, vocab 256, fp32, eval mode.

    The default intermediate size 320 is divisible by 64 but not by 128, so at
    group size 128 the down projections must stay dense and be listed in `ignore`.
    """
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=tie_word_embeddings,
    )
    return LlamaForCausalLM(config).eval()


def stored_tensors(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The state dict as a checkpoint stores it: a tied tensor only under its first name."""
    seen: set[int] = set()
    tensors = {}
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        tensors[name] = tensor
    return tensors


def write_checkpoint(
    directory: Path, model: PreTrainedModel, encoder: TensorEncoder, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Plan and encode every tensor, check they agree, write model.safetensors + config.json."""
    written: dict[str, torch.Tensor] = {}
    for name, tensor in stored_tensors(model).items():
        planned = encoder.plan(name, tuple(tensor.shape), dtype)
        encoded = encoder.encode(name, tensor.to(torch.float32), dtype)
        assert [(entry.name, entry.dtype, entry.shape) for entry in planned] == [
            (key, value.dtype, tuple(value.shape)) for key, value in encoded.items()
        ], name
        written.update({key: value.cpu().contiguous() for key, value in encoded.items()})
    directory.mkdir(parents=True, exist_ok=True)
    save_file(written, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config["dtype"] = str(dtype).removeprefix("torch.")
    config.update(encoder.config_update())
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return written
