"""Which checkpoint tensors are the weights of `torch.nn.Linear` modules.

compressed-tensors' `targets: ["Linear"]` quantizes exactly the modules whose
class is (or derives from) `torch.nn.Linear`, so INT4 must quantize those
weights and nothing else: not embeddings, not GPT-2's `Conv1D`, not fused
3-D expert tensors, not norms.

The answer comes from the architecture itself: the model is built on the
`meta` device (no memory, no weights) from the checkpoint's config.json, and
every Linear module's `<module>.weight` is collected. A Linear whose weight is
tied to another module's parameter (GPT-2's or a tied Llama's `lm_head`,
stored once as the embedding) is reported separately: it is never quantized
and must be listed in `ignore`.

When transformers is not installed, does not know the architecture, or
building it fails in any way (remote code, odd configs),
`linear_weight_names` returns None and callers fall back to
`is_linear_weight_by_name`: a 2-D `.weight` whose name has no part meaning an
embedding or the output head (`embed`, `wte`, `wpe`, `lm_head`, `shared`,
`embeddings`). That heuristic cannot tell `Conv1D` from Linear.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

LOG = logging.getLogger(__name__)

NOT_LINEAR_NAME = re.compile(r"(^|\.)(embed[^.]*|wte|wpe|lm_head|shared|embeddings)(\.|$)")


@dataclass(frozen=True)
class LinearLayout:
    """The Linear weights of an architecture: quantizable ones and tied ones."""

    weights: frozenset[str]
    tied_modules: frozenset[str]


def linear_weight_names(config_json: Mapping[str, Any]) -> set[str] | None:
    """`<module>.weight` of every untied `torch.nn.Linear` in the architecture, or None.

    None means the architecture could not be built (transformers missing or
    the model type unknown to it); use `is_linear_weight_by_name` then.
    """
    layout = linear_layout(config_json)
    return None if layout is None else set(layout.weights)


def linear_layout(config_json: Mapping[str, Any]) -> LinearLayout | None:
    """The architecture's Linear weights and tied Linear modules, from a meta-device build."""
    model = _meta_model(config_json)
    if model is None:
        return None
    owners: dict[int, list[tuple[str, torch.nn.Module]]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for parameter_name, parameter in module.named_parameters(recurse=False):
            full_name = f"{module_name}.{parameter_name}" if module_name else parameter_name
            owners.setdefault(id(parameter), []).append((full_name, module))
    weights: set[str] = set()
    tied: set[str] = set()
    for module_name, module in model.named_modules(remove_duplicate=False):
        if not isinstance(module, torch.nn.Linear) or not module_name:
            continue
        sharers = owners.get(id(module.weight), [])
        if len(sharers) > 1:
            tied.add(module_name)
        else:
            weights.add(f"{module_name}.weight")
    return LinearLayout(frozenset(weights), frozenset(tied))


def is_linear_weight_by_name(name: str, shape: tuple[int, ...]) -> bool:
    """Fallback heuristic: a 2-D `.weight` that does not look like an embedding or the head."""
    return len(shape) == 2 and name.endswith(".weight") and not NOT_LINEAR_NAME.search(name)


def _meta_model(config_json: Mapping[str, Any]) -> torch.nn.Module | None:
    try:
        import transformers
    except ImportError:
        return None
    settings = {key: value for key, value in config_json.items() if key != "quantization_config"}
    model_type = settings.pop("model_type", None)
    if not isinstance(model_type, str):
        LOG.warning("config.json has no model_type; Linear layers found by name")
        return None
    try:
        config = transformers.AutoConfig.for_model(model_type, **settings)
        model_class = _model_class(transformers, settings.get("architectures"))
        with torch.device("meta"):
            if model_class is not None:
                model: torch.nn.Module = model_class(config)
            else:
                auto_model: Any = transformers.AutoModelForCausalLM
                model = auto_model.from_config(config)
    except Exception as error:  # any failure to build means: find Linear layers by name
        LOG.warning(
            "cannot build %s on the meta device (%s); Linear layers found by name",
            model_type,
            error,
            extra={"model_type": model_type},
        )
        return None
    return model


def _model_class(transformers: Any, architectures: object) -> Any:
    """The first architecture named in config.json that this transformers defines as a
    `PreTrainedModel` subclass."""
    if not isinstance(architectures, list):
        return None
    for name in architectures:
        if not isinstance(name, str):
            continue
        candidate = getattr(transformers, name, None)
        if isinstance(candidate, type) and issubclass(candidate, transformers.PreTrainedModel):
            return candidate
    return None
