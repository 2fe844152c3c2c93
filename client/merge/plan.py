"""What a merge does to each base tensor, decided from headers and adapter factors alone.

`plan_merge` matches every adapter module to its base tensors (`<module>.weight`,
and `<module>.bias` for a `lora_B` bias), checks dtypes and shapes, and
plans every base tensor in file order: copied through (untouched, same dtype;
non-float tensors always), cast, or computed in fp32 (merged, NF4
round-tripped, replaced whole), with the encoder's planned outputs.

Copy and cast are decided per tensor: an untouched tensor whose encoder plan
stores it as it is (`encoding.stored_as_is`, e.g. an embedding or `lm_head`
that INT4 leaves dense) streams through whatever the encoder.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch

from peftreg.adapters.factors import ModuleFactors
from peftreg.checkpoint.encoding import PlannedTensor, TensorEncoder, stored_as_is
from peftreg.merge.base_checkpoint import BaseCheckpoint, BaseTensor
from peftreg.merge.compat import base_tensor_name, missing_weight
from peftreg.merge.errors import IncompatibleBase, MergeError
from peftreg.merge.inputs import LoadedAdapter

if TYPE_CHECKING:
    from peftreg.merge.peft_modules import PeftModules

BaseQuantizationChoice = Literal["none", "nf4"]
Contributions = list[tuple[ModuleFactors, float]]
TensorMode = Literal["copy", "cast", "compute"]

MERGEABLE_DTYPES = ("F16", "BF16", "F32", "F64")
# Module names of embeddings and the output head: weights transformers never NF4-quantizes.
EMBEDDING_MARKERS = ("embed", "wte", "wpe", "lm_head", "shared")


@dataclass
class TensorPlan:
    """What happens to one base tensor."""

    source: BaseTensor
    out_dtype: torch.dtype
    outputs: list[PlannedTensor]
    mode: TensorMode
    weight: Contributions = field(default_factory=list)  # factors adding to this weight
    bias: Contributions = field(default_factory=list)  # lora_B biases adding to this bias
    replacement: torch.Tensor | None = None  # a full value loaded in its place
    unchanged: list[tuple[str, torch.Tensor]] = field(default_factory=list)  # copies to check
    nf4: bool = False  # round-trip through NF4 first (QLoRA base)
    nf4_transposed: bool = False  # a GPT-2 Conv1D weight: quantized as its transpose
    as_is: bool = False  # the encoder stores it as it is, cast: `encode` is not called
    peft: tuple[PeftModules, str] | None = None  # merged by peft's layer of this module


@dataclass(frozen=True)
class MergePlan:
    tensors: list[TensorPlan]
    merged_modules: int

    @property
    def outputs(self) -> list[PlannedTensor]:
        return [output for plan in self.tensors for output in plan.outputs]


def is_nf4_quantized(tensor: BaseTensor) -> bool:
    """Linear / Conv1D weights: 2-D `.weight` tensors outside embeddings and lm_head."""
    if len(tensor.shape) != 2 or not tensor.name.endswith(".weight"):
        return False
    leaf = tensor.name[: -len(".weight")].rsplit(".", 1)[-1].lower()
    return not any(marker in leaf for marker in EMBEDDING_MARKERS)


class _Matcher:
    """The adapters' factors and full tensors, keyed by the base tensor they change."""

    def __init__(
        self, checkpoint: BaseCheckpoint, loaded: Sequence[LoadedAdapter], tied: bool
    ) -> None:
        self.names = checkpoint.by_name
        self.weights: dict[str, Contributions] = {}
        self.biases: dict[str, Contributions] = {}
        self.replacements: dict[str, torch.Tensor] = {}
        self.unchanged: dict[str, list[tuple[str, torch.Tensor]]] = {}
        self.modules: set[str] = set()
        self.peft: dict[str, tuple[PeftModules, str]] = {}
        for adapter in loaded:
            for module, factors in adapter.factors.items():
                self._add_factors(adapter, module, factors, tied)
            if adapter.modules is not None:
                for module, names in adapter.modules.targets(self.names).items():
                    self.peft.update((name, (adapter.modules, module)) for name in names)
                    self.modules.add(module)
        for adapter in loaded:
            self._add_replacements(adapter, many=len(loaded) > 1)

    def _add_factors(
        self, adapter: LoadedAdapter, module: str, factors: ModuleFactors, tied: bool
    ) -> None:
        label = adapter.source.name
        name = base_tensor_name(module, "weight", self.names)
        if name is None:
            raise IncompatibleBase(f"{label}: {missing_weight(module, tied_embeddings=tied)}")
        tensor = self.names[name]
        if tensor.dtype_name not in MERGEABLE_DTYPES:
            raise MergeError(
                f"the base's {name} is {tensor.dtype_name}; merge needs F16, BF16, F32 or "
                "F64 weights"
            )
        reason = factors.shape_mismatch(tensor.shape)
        if reason is not None:
            raise IncompatibleBase(
                f"{label}: the base's {name} has shape {list(tensor.shape)}, but for {module} "
                f"{reason}"
            )
        self.weights.setdefault(name, []).append((factors, adapter.source.weight))
        self.modules.add(module)
        if factors.bias is not None:
            bias = base_tensor_name(module, "bias", self.names)
            if bias is None:
                raise IncompatibleBase(
                    f"{label}: {module} has a lora_B bias, but the base has no {module}.bias "
                    "to add it to"
                )
            self.biases.setdefault(bias, []).append((factors, adapter.source.weight))

    def _add_replacements(self, adapter: LoadedAdapter, *, many: bool) -> None:
        label = adapter.source.name
        for name, value in adapter.replacements.items():
            module, _, suffix = name.rpartition(".")
            resolved = base_tensor_name(module, suffix, self.names) if module else None
            if resolved is None:
                raise IncompatibleBase(
                    f"{label}: its full tensor {name} (modules_to_save or a saved embedding) "
                    "has no counterpart in the base"
                )
            base = self.names[resolved]
            if tuple(value.shape) != base.shape:
                raise IncompatibleBase(
                    f"{label}: its {name} has shape {list(value.shape)}, the base's "
                    f"{list(base.shape)} (a resized vocabulary cannot be merged in place)"
                )
            if resolved in self.biases:
                raise MergeError(f"{label} both replaces and adapts {resolved}")
            if many:
                # Summed adapters may carry a copy of the base weight, never a new one.
                self.unchanged.setdefault(resolved, []).append((label, value))
            else:
                self.replacements[resolved] = value


def plan_merge(
    checkpoint: BaseCheckpoint,
    loaded: Sequence[LoadedAdapter],
    *,
    dtype: torch.dtype | None,
    base_quantization: BaseQuantizationChoice,
    encoder: TensorEncoder,
    tied_embeddings: bool,
) -> MergePlan:
    """Every base tensor's plan, in file order; raises before any tensor data is read."""
    matcher = _Matcher(checkpoint, loaded, tied_embeddings)
    conv1d = any(f.layer == "conv1d" for a in loaded for f in a.factors.values())
    plans: list[TensorPlan] = []
    for tensor in checkpoint.tensors:
        if tensor.dtype_name not in MERGEABLE_DTYPES:
            planned = [PlannedTensor(tensor.name, tensor.dtype, tensor.shape)]
            plans.append(TensorPlan(tensor, tensor.dtype, planned, "copy"))
            continue
        out_dtype = dtype or tensor.dtype
        nf4 = base_quantization == "nf4" and is_nf4_quantized(tensor)
        outputs = encoder.plan(tensor.name, tensor.shape, out_dtype)
        plan = TensorPlan(
            source=tensor,
            out_dtype=out_dtype,
            outputs=outputs,
            mode="compute",
            weight=matcher.weights.get(tensor.name, []),
            bias=matcher.biases.get(tensor.name, []),
            replacement=matcher.replacements.get(tensor.name),
            unchanged=matcher.unchanged.get(tensor.name, []),
            nf4=nf4,
            nf4_transposed=nf4 and conv1d,
            as_is=stored_as_is(tensor.name, tensor.shape, out_dtype, outputs),
            peft=matcher.peft.get(tensor.name),
        )
        if plan.nf4 and plan.peft is not None:
            raise MergeError(
                f"{plan.peft[0].label}: a {plan.peft[0].kind} adapter is merged into the "
                "stored weights, not into NF4-dequantized ones; merge it without base "
                "quantization nf4"
            )
        touched = plan.weight or plan.bias or plan.unchanged or plan.nf4 or plan.peft
        if not touched and plan.replacement is None and plan.as_is:
            plan.mode = "copy" if out_dtype == tensor.dtype else "cast"
        plans.append(plan)
    return MergePlan(plans, len(matcher.modules))


__all__ = [
    "BaseQuantizationChoice",
    "Contributions",
    "MergePlan",
    "TensorPlan",
    "is_nf4_quantized",
    "plan_merge",
]
