"""Merged mode: the adapter merged into the target weights, restored bitwise on every swap.

The targeted weights (and biases) are copied once at attach into a pristine
store. A swap first computes, outside the forward gate, W' = merged_weight(W0,
adapter) for each module the new adapter targets, from the pristine W0
(`peftreg.adapters.factors`), cast once to the weight's dtype and checked
finite there (`compute`). Only then, under the gate, are the results copied
into the live weights, and a module the previous adapter targeted but the
new one does not gets W0 copied back (`write`). Nothing is ever subtracted,
so after any number of swaps an unload leaves the weights bitwise identical
to the original. Computing ahead holds the new merged weights of the
targeted modules in memory until the flip.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import torch

from peftreg.adapters.factors import ModuleFactors, merged_bias, merged_weight
from peftreg.hotswap.errors import NonFiniteAdapter, UnsupportedAdapter
from peftreg.hotswap.targets import TargetSite
from peftreg.merge.errors import MergeError

if TYPE_CHECKING:
    from peftreg.merge.peft_modules import PeftModules

Merged = dict[str, tuple[torch.Tensor, torch.Tensor | None]]  # module -> (W', b' or None)


class PristineWeights:
    """The original weights and biases of the target sites, and merges computed from them."""

    def __init__(self, sites: Iterable[TargetSite], device: torch.device | str | None) -> None:
        self.sites = {site.name: site for site in sites}
        self.weights: dict[str, torch.Tensor] = {}
        self.biases: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name, site in self.sites.items():
                where = site.weight.device if device is None else torch.device(device)
                self.weights[name] = site.weight.detach().to(where, copy=True)
                if site.bias is not None:
                    self.biases[name] = site.bias.detach().to(where, copy=True)

    def nbytes(self) -> int:
        tensors = list(self.weights.values()) + list(self.biases.values())
        return sum(t.numel() * t.element_size() for t in tensors)

    def merged(self, name: str, factors: ModuleFactors) -> tuple[torch.Tensor, torch.Tensor | None]:
        """W' and b' of one module in the live tensors' dtype and device; checked finite."""
        site = self.sites[name]
        device = site.weight.device
        weight = merged_weight(self.weights[name], [(factors, 1.0)], device)
        weight = weight.to(site.weight.dtype)
        if not bool(torch.isfinite(weight).all()):
            raise NonFiniteAdapter(
                f"{name}: merging the adapter gives weights that are not finite in "
                f"{site.weight.dtype}"
            )
        bias = merged_bias(self.biases.get(name), [(factors, 1.0)], device)
        if bias is not None and site.bias is not None:
            bias = bias.to(site.bias.dtype)
            if not bool(torch.isfinite(bias).all()):
                raise NonFiniteAdapter(
                    f"{name}: merging the adapter's lora_B bias gives a bias that is not finite "
                    f"in {site.bias.dtype}"
                )
        return weight, bias

    def compute_peft(self, modules: PeftModules) -> Merged:
        """W' and b' of every module peft's layers adapt, merged by those layers from the
        pristine copies; nothing live is touched."""
        merged: Merged = {}
        with torch.no_grad():
            for name in modules.layers:
                site = self.sites[name]

                def read(tensor: str, name: str = name) -> torch.Tensor:
                    store = self.weights if tensor.endswith(".weight") else self.biases
                    return store[name]

                try:
                    weight = modules.merged(name, f"{name}.weight", read).to(site.weight.dtype)
                except MergeError as exc:  # peft's layer refuses (e.g. no bias to adapt)
                    raise UnsupportedAdapter(str(exc)) from None
                if not bool(torch.isfinite(weight).all()):
                    raise NonFiniteAdapter(
                        f"{name}: merging the adapter gives weights that are not finite in "
                        f"{site.weight.dtype}"
                    )
                bias = None
                if site.bias is not None:
                    bias = modules.merged(name, f"{name}.bias", read).to(site.bias.dtype)
                merged[name] = (weight.to(site.weight.device), bias)
        return merged

    def compute(self, factors: Mapping[str, ModuleFactors]) -> Merged:
        """W' and b' of every module `factors` targets; nothing live is touched."""
        with torch.no_grad():
            return {name: self.merged(name, item) for name, item in factors.items()}

    def restore(self, name: str) -> int:
        """Copy the pristine weight (and bias) back; bytes written."""
        site = self.sites[name]
        written = 0
        with torch.no_grad():
            site.weight.copy_(self.weights[name])
            written += site.weight.numel() * site.weight.element_size()
            if site.bias is not None and name in self.biases:
                site.bias.copy_(self.biases[name])
                written += site.bias.numel() * site.bias.element_size()
        return written

    def write(self, merged: Merged, previous: Iterable[str]) -> int:
        """Restore what `previous` touched and `merged` does not; copy `merged` in; bytes."""
        written = 0
        for name in sorted(set(previous) - set(merged)):
            written += self.restore(name)
        with torch.no_grad():
            for name, (weight, bias) in merged.items():
                site = self.sites[name]
                site.weight.copy_(weight)
                written += weight.numel() * weight.element_size()
                if site.bias is not None:
                    site.bias.copy_(self.biases[name] if bias is None else bias)
                    written += site.bias.numel() * site.bias.element_size()
        return written

    def restore_all(self) -> int:
        return sum(self.restore(name) for name in self.sites)
