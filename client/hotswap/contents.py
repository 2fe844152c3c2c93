"""What an adapter may hold for a host to serve it: only tensors the host consumes, and no
PEFT feature the host would silently ignore.

A host computes an adapter's effect from its factors (LoRA family), its IA3
vectors or its virtual tokens (prompt tuning, p-tuning, multitask prompt
tuning) and nothing else. A tensor it would not read
(a saved base bias with `bias="all"`, trainable-token deltas, a stray
module) or a config feature it does not implement (aLoRA's invocation
tokens, trainable tokens, parameter targets, layer replication) means the
served model would differ from the trained one, so such an adapter is
refused. The one tolerated extra is the copy of a targeted embedding's base
weight that PEFT saves beside embedding LoRA (`save_embedding_layers`): it
is kept and checked, when a host plans the swap, to equal the host's own
embedding weight.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from peftreg.adapters.factors import PEFT_PREFIX
from peftreg.adapters.nola import nola_key
from peftreg.adapters.schema import AdapterConfig
from peftreg.hotswap.errors import UnsupportedAdapter

PROMPT_TENSOR = "prompt_embeddings"
TASK_COLS = "prefix_task_cols"  # multitask prompt tuning: (tasks, n, ranks)
TASK_ROWS = "prefix_task_rows"  # (tasks, ranks, dim)
# The soft-prompt types a host's prompt slot serves: virtual tokens before the input embeddings.
PROMPT_KINDS = ("prompt_tuning", "p_tuning", "multitask_prompt_tuning")
UNSUPPORTED_FEATURES = (
    "modules_to_save",
    "alora_invocation_tokens",
    "trainable_token_indices",
    "target_parameters",
    "layer_replication",
)
_NOLA_PARTS = ("seed", "shape", "coefficients")


def check_features(config: AdapterConfig, source: str) -> None:
    """Refuse a PEFT config feature a host does not implement."""
    for feature in UNSUPPORTED_FEATURES:
        value = config.peft_config.get(feature)
        if value:
            raise UnsupportedAdapter(
                f"{source}: {feature}={value!r} is a PEFT feature a hot-swap host does not "
                "implement; serving the adapter without it would change its outputs"
            )


def base_layer_name(module: str) -> str:
    """Where PEFT saves a targeted embedding's base weight (`save_embedding_layers`)."""
    return f"{PEFT_PREFIX}{module}.base_layer.weight"


def consumed_tensors(config: AdapterConfig, names: Iterable[str]) -> set[str]:
    """The tensor names a host reads for `config` (of those present: optional ones)."""
    present = set(names)
    if config.kind == "multitask_prompt_tuning":
        return {PROMPT_TENSOR, TASK_COLS, TASK_ROWS}
    if config.kind in PROMPT_KINDS:
        return {PROMPT_TENSOR}
    consumed: set[str] = set()
    for target in config.targets:
        prefix = f"{PEFT_PREFIX}{target.module}"
        if config.kind == "nola":
            consumed |= {nola_key(target.module, f, p) for f in "AB" for p in _NOLA_PARTS}
            if config.nola is not None and config.nola.init_a:
                consumed.add(nola_key(target.module, "A", "init"))
            continue
        if target.layer == "embedding":
            consumed |= {f"{prefix}.lora_embedding_A", f"{prefix}.lora_embedding_B"}
        else:
            consumed |= {f"{prefix}.lora_A.weight", f"{prefix}.lora_B.weight"}
        if config.kind == "dora":
            consumed.add(f"{prefix}.lora_magnitude_vector")
        if f"{prefix}.lora_B.bias" in present:
            consumed.add(f"{prefix}.lora_B.bias")
    return consumed


def saved_base_layers(
    config: AdapterConfig, tensors: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """module -> the base weight PEFT saved for a targeted embedding (checked at plan time)."""
    return {
        target.module: tensors[base_layer_name(target.module)]
        for target in config.targets
        if target.layer == "embedding" and base_layer_name(target.module) in tensors
    }


def check_consumed(config: AdapterConfig, names: Iterable[str], source: str) -> None:
    """Refuse tensors the host would not read."""
    present = set(names)
    tolerated = {base_layer_name(t.module) for t in config.targets if t.layer == "embedding"}
    extra = sorted(present - consumed_tensors(config, present) - tolerated)
    if extra:
        shown = ", ".join(extra[:3]) + (f" (and {len(extra) - 3} more)" if len(extra) > 3 else "")
        raise UnsupportedAdapter(
            f"{source}: the {config.kind} adapter holds tensors a hot-swap host does not use: "
            f"{shown}; refusing rather than serving part of the adapter"
        )
