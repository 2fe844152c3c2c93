"""A tiny Llama with a real byte-level BPE tokenizer that llama.cpp accepts, built here.

Nothing is downloaded: the tokenizer is trained with the `tokenizers` package
on Python's own help texts (`pydoc_data.topics`, shipped with the standard
library), and the model is built from a config with random weights, scaled up
so that its greedy choices are decided by clear margins. Rows of 256 and 512
values let the K-quant types (Q4_K, Q6_K) apply.
"""

from __future__ import annotations

from pathlib import Path
from pydoc_data.topics import topics

import torch
from peft import LoraConfig
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from tests.merge.builders import save_adapter

SPECIAL = "<|endoftext|>"
VOCAB = 320
PROMPT = "The with statement is used to wrap the execution of a block"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def corpus(limit: int = 200_000) -> str:
    """Real English text from the standard library's help topics."""
    return "\n\n".join(topics[key] for key in sorted(topics))[:limit]


def byte_level_tokenizer(vocab: int = VOCAB) -> PreTrainedTokenizerFast:
    """A GPT-2 style byte-level BPE tokenizer trained on `corpus()`."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=[SPECIAL],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([corpus(50_000)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=SPECIAL, eos_token=SPECIAL)


def tiny_llama_with_tokenizer(
    directory: Path,
    *,
    seed: int = 0,
    hidden_size: int = 256,
    intermediate_size: int = 512,
    weight_scale: float = 4.0,
) -> LlamaForCausalLM:
    """Save a 2-layer Llama (GQA 4/2 heads) and its tokenizer in `directory`.

    Its matrices are scaled by `weight_scale` (clear margins for greedy choices).
    """
    tokenizer = byte_level_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = LlamaForCausalLM(config).eval()
    if weight_scale != 1.0:
        with torch.no_grad():
            for parameter in model.parameters():
                if parameter.dim() == 2:
                    parameter.mul_(weight_scale)
    model.save_pretrained(str(directory), safe_serialization=True)
    tokenizer.save_pretrained(str(directory))
    return model


def tiny_qwen2_with_tokenizer(directory: Path, *, seed: int = 0) -> Qwen2ForCausalLM:
    """Save a 2-layer Qwen2 (q/k/v biases, tied embeddings) and its tokenizer."""
    tokenizer = byte_level_tokenizer()
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() == 2:
                parameter.mul_(4.0)
            elif name.endswith(".bias"):
                parameter.normal_(0.0, 0.5)
    model.save_pretrained(str(directory), safe_serialization=True)
    tokenizer.save_pretrained(str(directory))
    return model


def rslora_adapter(model: LlamaForCausalLM, directory: Path) -> Path:
    """A rank-4 rsLoRA on every Linear layer, with random non-zero B (scaling alpha/sqrt(r))."""
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_rslora=True)
    return save_adapter(model, config, directory, seed=11)
