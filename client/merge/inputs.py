"""The adapters of a merge: where their config and tensors are, and their weight in the sum.

An `AdapterInput` comes from a PEFT directory on disk or from a pulled
snapshot (whose AdapterConfig is the artifact's config blob). Adapter tensors
are small, so `load_adapter` reads them whole (after the strict header check)
and turns them into factors (`peftreg.adapters.factors`) plus the full-weight
replacements PEFT saves for `modules_to_save` (`base_model.model.<name>`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file

from peftreg.adapters.factors import PEFT_PREFIX, ModuleFactors, adapter_factors
from peftreg.adapters.peft_import import (
    NOLA_FILE,
    TENSORS_FILE,
    read_peft_directory,
    read_safetensors_header,
)
from peftreg.adapters.schema import GENERIC_KINDS, AdapterConfig
from peftreg.merge.compat import BOTTLENECK_REASON
from peftreg.merge.errors import MergeError

if TYPE_CHECKING:  # needs peft and transformers: imported when such an adapter is merged
    from peftreg.merge.peft_modules import PeftModules

LORA_PARTS = (
    ".lora_A.weight",
    ".lora_B.weight",
    ".lora_B.bias",
    ".lora_embedding_A",
    ".lora_embedding_B",
    ".lora_magnitude_vector",
)


@dataclass(frozen=True)
class AdapterInput:
    """One adapter of a merge, with its weight in the sum (1.0 for a plain merge)."""

    config: AdapterConfig
    tensors_path: Path  # adapter_model.safetensors, or nola.safetensors for NOLA
    weight: float = 1.0
    digest: str | None = None  # the artifact's manifest digest, recorded in the recipe
    label: str | None = None  # how messages name it; the directory by default

    @property
    def name(self) -> str:
        return self.label or str(self.tensors_path.parent)


def adapter_from_peft_directory(
    path: Path, *, weight: float = 1.0, digest: str | None = None, label: str | None = None
) -> AdapterInput:
    """A PEFT directory (`adapter_config.json` + tensors), imported as push would."""
    imported = read_peft_directory(Path(path))
    return AdapterInput(imported.config, imported.tensors_path, weight, digest, label or str(path))


def adapter_from_snapshot(
    snapshot: Path,
    config: AdapterConfig | bytes | str,
    *,
    weight: float = 1.0,
    digest: str | None = None,
    label: str | None = None,
) -> AdapterInput:
    """A pulled adapter artifact: its snapshot directory and its config blob."""
    parsed = (
        config if isinstance(config, AdapterConfig) else AdapterConfig.model_validate_json(config)
    )
    if parsed.kind == "bottleneck":  # its tensors file is AdapterHub's, not PEFT's
        name = label or digest or str(snapshot)
        raise MergeError(f"{name} is a bottleneck adapter: {BOTTLENECK_REASON}")
    title = NOLA_FILE if parsed.kind == "nola" else TENSORS_FILE
    path = Path(snapshot) / title
    if not path.is_file():
        raise MergeError(f"the adapter snapshot {snapshot} has no {title}")
    return AdapterInput(parsed, path, weight, digest, label or digest or str(snapshot))


@dataclass(frozen=True)
class LoadedAdapter:
    """An adapter's factors per target module, and its full-weight replacements; or, for
    the other peft types, peft's own layers, merged module by module."""

    source: AdapterInput
    factors: dict[str, ModuleFactors]
    # base tensor name -> the full value PEFT loads in its place: `modules_to_save` copies
    # and the embedding weights saved with an adapter that targets (or resized) them.
    replacements: dict[str, torch.Tensor] = field(default_factory=dict)
    modules: PeftModules | None = None


def _replacements(tensors: Mapping[str, torch.Tensor], label: str) -> dict[str, torch.Tensor]:
    result: dict[str, torch.Tensor] = {}
    for name, value in tensors.items():
        if name.endswith(LORA_PARTS):
            continue
        if not name.startswith(PEFT_PREFIX):
            raise MergeError(f"{label}: tensor {name} is not one peftreg knows how to merge")
        # An embedding targeted by LoRA is saved whole as `<module>.base_layer.weight`.
        result[name[len(PEFT_PREFIX) :].replace(".base_layer.", ".")] = value
    return result


def load_adapter(
    adapter: AdapterInput, model_config: Mapping[str, Any] | None = None
) -> LoadedAdapter:
    """Read the adapter's tensors (strict header check first) into factors and replacements;
    an adapter of another peft type into peft's layers on the base's architecture
    (`model_config`, its config.json)."""
    read_safetensors_header(adapter.tensors_path)
    tensors = load_file(str(adapter.tensors_path), device="cpu")
    if adapter.config.kind in GENERIC_KINDS:
        if model_config is None:
            raise MergeError(
                f"{adapter.name}: merging a {adapter.config.kind} adapter needs the base's "
                "config.json"
            )
        try:
            from peftreg.merge.peft_modules import PeftModules
        except ImportError as exc:  # peft is in the worker extra, not the hotswap one
            raise MergeError(
                f"{adapter.name}: merging a {adapter.config.kind} adapter needs peft and "
                f"transformers installed ({exc})"
            ) from None
        modules = PeftModules(adapter.config, tensors, model_config, adapter.name)
        return LoadedAdapter(adapter, {}, modules=modules)
    factors = adapter_factors(adapter.config, tensors)
    replacements = {} if adapter.config.kind == "nola" else _replacements(tensors, adapter.name)
    return LoadedAdapter(adapter, factors, replacements)


__all__ = [
    "AdapterInput",
    "LoadedAdapter",
    "adapter_from_peft_directory",
    "adapter_from_snapshot",
    "load_adapter",
]
