"""A tiny Llama with a trained byte-level tokenizer, for the GPTQ / AWQ tests (nothing
downloaded): hidden 128, intermediate 256 (every group size up to 128 divides both),
2 layers, GQA 4/2 heads, vocab 320, random fp32 weights (unscaled)."""

from __future__ import annotations

from pathlib import Path

from transformers import LlamaForCausalLM

from tests.gguf import models


def tiny_llama_with_tokenizer(directory: Path, *, seed: int = 0) -> LlamaForCausalLM:
    """Save the model and its tokenizer in `directory`; return the model (eval mode)."""
    return models.tiny_llama_with_tokenizer(
        directory, seed=seed, hidden_size=128, intermediate_size=256, weight_scale=1.0
    )
