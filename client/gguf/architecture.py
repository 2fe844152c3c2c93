"""What llama.cpp needs to know of a Hugging Face architecture: metadata keys, tensor names,
and the Q/K row order.

Supported: Llama (`LlamaForCausalLM`, GGUF architecture `llama`) and Qwen2
(`Qwen2ForCausalLM`, `qwen2`); anything else is refused with the list. The
facts follow llama.cpp's `convert_hf_to_gguf.py`:

- metadata: `<arch>.context_length`, `.embedding_length`, `.block_count`,
  `.feed_forward_length`, `.attention.head_count`, `.attention.head_count_kv`,
  `.attention.layer_norm_rms_epsilon`, `.rope.freq_base`,
  `.rope.dimension_count` (the head size), `.vocab_size`;
- tensor names through the `gguf` package's `TensorNameMap`
  (`model.layers.3.self_attn.q_proj.weight` -> `blk.3.attn_q.weight`);
- Llama's q_proj / k_proj rows are permuted from Hugging Face's rotate-half
  RoPE layout to llama.cpp's interleaved one (`permute_rows`); Qwen2 uses
  NEOX RoPE in llama.cpp and keeps them as they are.

RoPE scaling other than none is refused: its GGUF form (e.g. Llama 3.1's
`rope_freqs` tensor) is not written yet.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import gguf
import numpy as np
from numpy.typing import NDArray

from peftreg.gguf.errors import GgufUnsupported
from peftreg.gguf.formats import check_gguf_architecture

ARCHITECTURES: dict[str, tuple[gguf.MODEL_ARCH, bool]] = {
    # Hugging Face class -> (GGUF architecture, Q/K rows permuted)
    "LlamaForCausalLM": (gguf.MODEL_ARCH.LLAMA, True),
    "Qwen2ForCausalLM": (gguf.MODEL_ARCH.QWEN2, False),
}
SKIPPED_SUFFIXES = (".rotary_emb.inv_freq",)


def _rope_theta(config: Mapping[str, Any]) -> float:
    parameters = config.get("rope_parameters") or {}
    theta = config.get("rope_theta", parameters.get("rope_theta", 10000.0))
    return float(theta)


def _check_rope_scaling(config: Mapping[str, Any], name: str) -> None:
    scaling = config.get("rope_scaling") or config.get("rope_parameters") or {}
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if kind not in ("default", None):
        raise GgufUnsupported(
            f"the base ({name}) uses RoPE scaling {kind!r}; GGUF export supports unscaled RoPE "
            "only so far"
        )


@dataclass(frozen=True)
class GgufArchitecture:
    """One base model's GGUF architecture, read from its config.json."""

    hf_class: str
    arch: gguf.MODEL_ARCH
    permute_qk: bool
    config: Mapping[str, Any]

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.arch]

    @property
    def blocks(self) -> int:
        return int(self.config["num_hidden_layers"])

    @property
    def heads(self) -> int:
        return int(self.config["num_attention_heads"])

    @property
    def kv_heads(self) -> int:
        return int(self.config.get("num_key_value_heads") or self.heads)

    @property
    def head_dim(self) -> int:
        explicit = self.config.get("head_dim")
        return int(explicit) if explicit else int(self.config["hidden_size"]) // self.heads

    def add_metadata(self, writer: gguf.GGUFWriter, vocab_size: int) -> None:
        config = self.config
        writer.add_context_length(int(config.get("max_position_embeddings", 2048)))
        writer.add_embedding_length(int(config["hidden_size"]))
        writer.add_block_count(self.blocks)
        writer.add_feed_forward_length(int(config["intermediate_size"]))
        writer.add_head_count(self.heads)
        writer.add_head_count_kv(self.kv_heads)
        writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
        writer.add_rope_freq_base(_rope_theta(config))
        writer.add_rope_dimension_count(self.head_dim)
        if self.head_dim != int(config["hidden_size"]) // self.heads:
            writer.add_key_length(self.head_dim)
            writer.add_value_length(self.head_dim)
        writer.add_vocab_size(vocab_size)

    def tensor_name(self, hf_name: str) -> str | None:
        """The GGUF name of a checkpoint tensor; None for tensors llama.cpp does not load."""
        if hf_name.endswith(SKIPPED_SUFFIXES):
            return None
        names = gguf.get_tensor_name_map(self.arch, self.blocks)
        mapped = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise GgufUnsupported(
                f"the base's tensor {hf_name} has no GGUF name for architecture {self.name}"
            )
        return mapped

    def heads_of(self, gguf_name: str) -> int | None:
        """How many heads a Q (`attn_q`) or K (`attn_k`) weight's rows are permuted by."""
        if not self.permute_qk:
            return None
        if gguf_name.endswith(".attn_q.weight"):
            return self.heads
        if gguf_name.endswith(".attn_k.weight"):
            return self.kv_heads
        return None


def permute_rows(rows: NDArray[Any], heads: int) -> NDArray[Any]:
    """Hugging Face's rotate-half row order of a Q/K projection -> llama.cpp's interleaved
    one: in each head, rows (0..d/2, d/2..d) become pairs (0, d/2), (1, d/2+1), ..."""
    shape = rows.shape
    grouped = rows.reshape(heads, 2, shape[0] // heads // 2, *shape[1:])
    return np.ascontiguousarray(grouped.swapaxes(1, 2).reshape(shape))


def architecture_of(config: Mapping[str, Any]) -> GgufArchitecture:
    """The base's GGUF architecture; GgufUnsupported (naming the supported ones) otherwise."""
    classes = config.get("architectures") or []
    name = classes[0] if classes else str(config.get("model_type", "unknown"))
    check_gguf_architecture(name)
    _check_rope_scaling(config, name)
    arch, permute = ARCHITECTURES[name]
    return GgufArchitecture(name, arch, permute, dict(config))


__all__ = ["ARCHITECTURES", "GgufArchitecture", "architecture_of", "permute_rows"]
