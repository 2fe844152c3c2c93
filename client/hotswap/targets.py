"""Which modules of a model a host attaches slots to, and their shapes."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from peftreg.adapters.factors import LayerKind
from peftreg.hotswap.config import ALL_LINEAR
from peftreg.hotswap.errors import HostError


@dataclass(frozen=True)
class TargetSite:
    """One module a host serves adapters on.

    `in_features` / `out_features` are the LoRA sides: A is (r, in_features)
    and B (out_features, r); for an embedding, in is the vocabulary and out
    the embedding dimension.
    """

    name: str
    module: nn.Module
    layer: LayerKind
    in_features: int
    out_features: int

    @property
    def weight(self) -> torch.Tensor:
        weight = self.module.weight
        assert isinstance(weight, torch.Tensor)
        return weight

    @property
    def bias(self) -> torch.Tensor | None:
        bias = getattr(self.module, "bias", None)
        return bias if isinstance(bias, torch.Tensor) else None

    @property
    def weight_shape(self) -> tuple[int, int]:
        """The shape an adapter's delta must have (`ModuleFactors.weight_shape`)."""
        if self.layer == "linear":
            return self.out_features, self.in_features
        return self.in_features, self.out_features


def layer_kind(module: nn.Module) -> LayerKind | None:
    """linear, conv1d (transformers' GPT-2 `Conv1D`, weight (in, out)), embedding, or None."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        return None
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if type(module).__name__ == "Conv1D":
        return "conv1d"
    return None


def _site(name: str, module: nn.Module, layer: LayerKind) -> TargetSite:
    rows, cols = (int(n) for n in module.weight.shape)  # type: ignore[union-attr]
    if layer == "linear":
        return TargetSite(name, module, layer, cols, rows)
    if layer == "embedding" and getattr(module, "max_norm", None) is not None:
        raise HostError(f"{name}: an embedding with max_norm rewrites its weights on lookup")
    return TargetSite(name, module, layer, rows, cols)


def _output_layer(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    if not callable(getter):
        return None
    try:
        layer = getter()
    except (AttributeError, NotImplementedError):
        return None
    return layer if isinstance(layer, nn.Module) else None


def _matches(name: str, targets: str | Sequence[str]) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == target or name.endswith(f".{target}") for target in targets)


def resolve_targets(model: nn.Module, targets: str | Sequence[str]) -> list[TargetSite]:
    """The target sites, in module order; an unsupported matched module is an error."""
    sites: list[TargetSite] = []
    output = _output_layer(model)
    for name, module in model.named_modules():
        if not name:
            continue
        layer = layer_kind(module)
        if isinstance(targets, str) and targets == ALL_LINEAR:
            if layer in ("linear", "conv1d") and module is not output:
                assert layer is not None
                sites.append(_site(name, module, layer))
            continue
        if not _matches(name, targets):
            continue
        if layer is None:
            raise HostError(
                f"target {name} is a {type(module).__name__}; hot-swap serves Linear, "
                "transformers Conv1D and Embedding layers"
            )
        sites.append(_site(name, module, layer))
    if not sites:
        raise HostError(f"no module of {type(model).__name__} matches the targets {targets!r}")
    return sites


def refuse_tied_for_merged(model: nn.Module, sites: Sequence[TargetSite]) -> None:
    """Merged mode writes into the target weights; a weight the model shares with another
    module (tied input and output embeddings) would change that module too, so it is
    refused, naming the mode that serves it."""
    owners: dict[tuple[int, tuple[int, ...]], list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        owners.setdefault((parameter.data_ptr(), tuple(parameter.shape)), []).append(name)
    for site in sites:
        shared = owners.get((site.weight.data_ptr(), tuple(site.weight.shape)), [])
        others = [name for name in shared if name != f"{site.name}.weight"]
        if others:
            raise HostError(
                f"{site.name}: its weight is tied to {', '.join(others)} (tie_word_embeddings), "
                "so merging an adapter into it would change that module too; hot-swap serves "
                "adapters on tied weights in mode='unmerged'"
            )
