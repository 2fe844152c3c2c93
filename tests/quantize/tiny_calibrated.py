"""A tiny Llama with a trained byte-level tokenizer, for the GPTQ / AWQ tests (nothing
downloaded): hidden 128, intermediate 256 (every group size up to 128 divides both),
2 layers, GQA 4/2 heads, vocab 320, random fp32 weights."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tests.gguf.models import byte_level_tokenizer


def tiny_llama_with_tokenizer(directory: Path, *, seed: int = 0) -> LlamaForCausalLM:
    """Save the model and its tokenizer in `directory`; return the model (eval mode)."""
    tokenizer = byte_level_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return model
