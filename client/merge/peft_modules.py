"""peft's own merge, one module at a time, for the peft types beyond the LoRA family.

Rather than re-deriving each type's delta (IA3's scaling, LoHa's Hadamard
product, OFT's rotation, ...), the base architecture is built with peft on the
meta device and the adapter's tensors are loaded into it. Merging a module
then gives its tuner layer the module's real base weight (and bias), read
from the checkpoint, calls the layer's own `merge`, and takes the merged
tensors out again: one module's weights in memory at a time, and exactly
peft's `merge_and_unload` arithmetic.

A type whose layers compute state at initialisation that is not saved (seeded
index sets, ...) cannot be loaded on the meta device: the model is then built
on the CPU with zero base weights (memory committed for the whole base), and
the state is computed as peft computes it when it loads the adapter.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from peft import set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from peftreg.adapters.peft_layout import build_peft_model
from peftreg.adapters.schema import AdapterConfig
from peftreg.merge.errors import MergeError

ADAPTER_NAME = "default"
ReadTensor = Callable[[str], torch.Tensor]  # a base tensor by name, as stored


class PeftModules:
    """An adapter of a generic peft type, ready to merge module by module."""

    def __init__(
        self,
        config: AdapterConfig,
        tensors: Mapping[str, torch.Tensor],
        model_config: Mapping[str, Any],
        label: str,
    ) -> None:
        self.label = label
        self.kind = config.kind
        self.model = self._load(config, dict(tensors), model_config)
        root = self.model.base_model.model
        self.layers: dict[str, Any] = {
            name: module
            for name, module in root.named_modules()
            if isinstance(module, BaseTunerLayer) and name
        }
        if not self.layers:
            raise MergeError(f"{label}: its {self.kind} config adapts no module of the base")
        self._cache: tuple[str, dict[str, torch.Tensor]] | None = None

    def _load(
        self,
        config: AdapterConfig,
        tensors: dict[str, torch.Tensor],
        model_config: Mapping[str, Any],
    ) -> Any:
        try:
            model = build_peft_model(config.peft_config, model_config)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                set_peft_model_state_dict(model, tensors, low_cpu_mem_usage=True)
            if not self._adapter_on_meta(model):
                return model
        except (NotImplementedError, RuntimeError):
            pass
        model = build_peft_model(config.peft_config, model_config, device="cpu")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            set_peft_model_state_dict(model, tensors)
        return model

    @staticmethod
    def _adapter_on_meta(model: Any) -> bool:
        """Whether any adapter parameter or buffer (peft keys them by the adapter's name)
        has no data."""
        named = [
            *model.named_parameters(remove_duplicate=False),
            *model.named_buffers(remove_duplicate=False),
        ]
        return any(tensor.is_meta for name, tensor in named if ADAPTER_NAME in name.split("."))

    def targets(self, names: Mapping[str, Any]) -> dict[str, list[str]]:
        """module -> the base tensors its merge rewrites (weight, and bias when stored)."""
        result: dict[str, list[str]] = {}
        for module, layer in self.layers.items():
            base = layer.get_base_layer()
            owned = [f"{module}.{key}" for key, _ in base.named_parameters(recurse=False)]
            missing = [name for name in owned if name not in names]
            if missing:
                raise MergeError(
                    f"{self.label}: the base has no tensor {missing[0]} for the adapter's "
                    f"target {module}"
                )
            result[module] = owned
        return result

    def merged(self, module: str, name: str, read: ReadTensor) -> torch.Tensor:
        """The merged fp32 value of base tensor `name` of `module` (its siblings are read
        with `read` and kept until asked for)."""
        if self._cache is None or self._cache[0] != module:
            self._cache = (module, self._merge(module, read))
        value = self._cache[1].pop(name)
        if not self._cache[1]:
            self._cache = None
        return value

    def _merge(self, module: str, read: ReadTensor) -> dict[str, torch.Tensor]:
        layer = self.layers[module]
        base = layer.get_base_layer()
        keys = [key for key, _ in base.named_parameters(recurse=False)]
        for key in keys:
            value = read(f"{module}.{key}").to(torch.float32, copy=True)  # merged in place
            setattr(base, key, nn.Parameter(value, requires_grad=False))
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                layer.merge(adapter_names=[ADAPTER_NAME])
        except (NotImplementedError, ValueError, RuntimeError) as exc:
            raise MergeError(
                f"{self.label}: peft cannot merge its {self.kind} adapter into {module}: {exc}"
            ) from None
        merged = layer.get_base_layer()
        result = {
            f"{module}.{key}": value.detach().to(torch.float32).clone()
            for key, value in merged.named_parameters(recurse=False)
        }
        if sorted(result) != sorted(f"{module}.{key}" for key in keys):
            raise MergeError(
                f"{self.label}: merging its {self.kind} adapter into {module} changes which "
                "tensors the module has, so it cannot be merged into the stored weights"
            )
        for key in keys:  # release the module's weights: one module in memory at a time
            shape = getattr(base, key).shape
            setattr(base, key, nn.Parameter(torch.empty(shape, device="meta"), False))
        return result


__all__ = ["PeftModules"]
