"""The GGUF choices a request can name, importable without torch, numpy or `gguf`.

The API checks export requests with these (the service plans exports without
the worker's libraries); `tensor_types` and `architecture` act on them.
"""

from __future__ import annotations

from typing import Literal, get_args

from peftreg.gguf.errors import GgufUnsupported

GgufQuantization = Literal["f16", "q8_0", "q4_0", "q4_k_m"]
GGUF_QUANTIZATIONS: tuple[str, ...] = get_args(GgufQuantization)
# Hugging Face model classes written as GGUF (see `architecture.ARCHITECTURES`).
GGUF_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM")


def check_gguf_architecture(name: str | None) -> None:
    """GgufUnsupported unless `name` (config.json's `architectures[0]`) has a GGUF form here."""
    if name not in GGUF_ARCHITECTURES:
        raise GgufUnsupported(
            f"GGUF export supports the architectures {', '.join(GGUF_ARCHITECTURES)}; "
            f"the base is {name or 'of an unrecorded architecture'}"
        )


__all__ = [
    "GGUF_ARCHITECTURES",
    "GGUF_QUANTIZATIONS",
    "GgufQuantization",
    "check_gguf_architecture",
]
