"""Tiny transformers models with random weights, built from configs (nothing downloaded)."""

from __future__ import annotations

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

LLAMA_NAME = "tiny-llama"
GPT2_NAME = "tiny-gpt2"
QWEN2_NAME = "tiny-qwen2"


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """Hidden 32, 2 layers, vocab 64, fp32, eval mode; the same weights for the same seed."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.config._name_or_path = LLAMA_NAME
    return model.eval()


def tiny_qwen2(seed: int = 0) -> Qwen2ForCausalLM:
    """Hidden 32, 2 layers, 4 heads sharing 2 key/value heads (GQA), q/k/v biases, tied
    input and output embeddings (tie_word_embeddings=True), vocab 64, fp32, eval mode."""
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    model = Qwen2ForCausalLM(config)
    model.config._name_or_path = QWEN2_NAME
    return model.eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    """n_embd 32, 2 layers, vocab 64 (GPT-2 Conv1D layers: fan_in_fan_out)."""
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=64,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=128,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = GPT2LMHeadModel(config)
    model.config._name_or_path = GPT2_NAME
    return model.eval()


def same_weights(model: PreTrainedModel) -> PreTrainedModel:
    """A fresh model of the same class and config holding a copy of `model`'s weights."""
    fresh = type(model)(model.config)
    fresh.load_state_dict(model.state_dict())
    return fresh.eval()


def sample_ids(vocab: int = 64, length: int = 12, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (2, length), generator=generator)
