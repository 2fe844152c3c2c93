"""Planning a swap: an adapter checked against one host before anything is written.

`SwapPlanner.plan` checks the base identity the adapter records, that every
module it targets has a slot of the right layer kind and shape, the ranks,
the virtual tokens (a multitask prompt: the task asked for), the saved
embedding base layers, IA3 vectors against the slots' scales, and that
every value staged fits the dtype it is staged in: a value finite in fp32 can be
infinite in an fp16 slot. For each module the largest entry of the delta,
scaling * rank * max|B| * max|A|, must be representable too. DoRA row factors
(which need the base weights) are computed and checked by `dora_rows` when
the factors are staged. Merged mode checks the merged weights themselves
(`peftreg.hotswap.merged`).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

from peftreg.adapters.factors import ModuleFactors, delta_weight, dora_row_scale
from peftreg.adapters.ia3 import Ia3Scale
from peftreg.hotswap.adapter import FactorBounds, LoadedAdapter, largest
from peftreg.hotswap.config import HostConfig
from peftreg.hotswap.errors import (
    AdapterShapeMismatch,
    BaseMismatch,
    NonFiniteAdapter,
    RankTooLarge,
    TooManyVirtualTokens,
    UnsupportedAdapter,
)
from peftreg.hotswap.targets import TargetSite

if TYPE_CHECKING:
    from peftreg.hotswap.layouts import FactorLayout
    from peftreg.merge.peft_modules import PeftModules

EMPTY = "empty"  # what the spare buffers hold after an unload was staged in them


class SlotShape(Protocol):
    """What a plan checks of a module's slot (`ModuleSlot`, or a multi-adapter stacked slot)."""

    @property
    def device(self) -> torch.device: ...
    @property
    def dtype(self) -> torch.dtype: ...
    @property
    def output_scale(self) -> float: ...
    @property
    def ia3(self) -> bool: ...  # holds IA3 scale vectors


class PromptShape(Protocol):
    """What a plan checks of a soft-prompt slot."""

    @property
    def max_tokens(self) -> int: ...
    @property
    def dim(self) -> int: ...
    @property
    def dtype(self) -> torch.dtype: ...


@dataclass(frozen=True)
class SwapPlan:
    """A checked swap: what each slot gets (absent: nothing)."""

    adapter: LoadedAdapter | None
    factors: dict[str, ModuleFactors] = field(default_factory=dict)
    prompt: torch.Tensor | None = None
    peft: PeftModules | None = None  # merged mode: another peft type, merged by peft
    ia3: dict[str, Ia3Scale] = field(default_factory=dict)  # unmerged IA3: vector per module
    task: int | None = None  # a multitask prompt's task

    @property
    def content(self) -> str:
        """What the slots hold once the plan is staged: the digest (and task)."""
        if self.adapter is None:
            return EMPTY
        return content_of(self.adapter.digest, self.task)


def content_of(digest: str, task: int | None) -> str:
    return digest if task is None else f"{digest}#task={task}"


def dtype_max(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max)


def check_fits(what: str, value: float, dtype: torch.dtype) -> None:
    """Refuse `value` (a largest magnitude) that is not finite in `dtype`."""
    if not value <= dtype_max(dtype):  # also refuses NaN
        raise NonFiniteAdapter(
            f"{what}: a value of magnitude {value:.3g} overflows {dtype} (max "
            f"{dtype_max(dtype):.3g}); refusing the adapter"
        )


@dataclass(frozen=True)
class _LayoutLimits:
    """What an adapter's values are checked against on one host, for every adapter of a
    layout: the slots' dtype (one for all the modules), the largest |gain| (scaling times
    the slot's output scale) and the largest |gain| * rank."""

    dtype: torch.dtype
    gain: float
    delta: float

    @classmethod
    def of(cls, planner: SwapPlanner, adapter: LoadedAdapter) -> _LayoutLimits | None:
        """None when the modules have no slots (merged mode) or slots of several dtypes."""
        dtypes, gain, delta = set(), 0.0, 0.0
        for name, factors in adapter.factors.items():
            slot = planner.slots.get(name)
            if slot is None:
                return None
            dtypes.add(slot.dtype)
            scaled = abs(factors.scaling * slot.output_scale)
            gain, delta = max(gain, scaled), max(delta, scaled * factors.rank)
        if len(dtypes) != 1:
            return None
        return cls(dtypes.pop(), gain, delta)


class SwapPlanner:
    """The checks of one host; `base_weight(name)` gives a site's original weight."""

    def __init__(
        self,
        config: HostConfig,
        sites: Sequence[TargetSite],
        slots: Mapping[str, SlotShape],
        prompt: PromptShape | None,
        base_identity: tuple[str | None, str | None],
        base_weight: Callable[[str], torch.Tensor],
        model_config: Mapping[str, Any] | None = None,
    ) -> None:
        self.config = config
        self.model_config = model_config
        self.sites = {site.name: site for site in sites}
        self.slots = slots
        self.prompt = prompt
        self.base_fingerprint, self.base_structure_hash = base_identity
        self.base_weight = base_weight
        self._verified_base_layers: set[str] = set()  # adapter digests already checked
        # digest -> the adapter object whose factors and prompt passed every check: the
        # same object (immutable) planned again is not checked again (a warm swap)
        self._checked: dict[str, weakref.ref[LoadedAdapter]] = {}
        # id(layout) -> (the layout, its limits): an adapter of that layout passed
        self._layouts: dict[int, tuple[FactorLayout, _LayoutLimits | None]] = {}

    def plan(self, adapter: LoadedAdapter | None, task_id: int | None = None) -> SwapPlan:
        """Check `adapter` (for a multitask prompt: its task `task_id`) against this host
        (raises SwapError); nothing is written."""
        if adapter is None:
            return SwapPlan(None)
        self._check_base(adapter)
        task = self._check_task(adapter, task_id)
        if adapter.ia3 and self.config.mode == "unmerged":
            return SwapPlan(adapter, ia3=self._check_ia3(adapter))
        if adapter.peft_tensors:
            return SwapPlan(adapter, peft=self._peft_modules(adapter))
        checked = self._checked.get(adapter.digest)
        if checked is None or checked() is not adapter:
            self._check_contents(adapter)
            self._remember(adapter)
        prompt = adapter.prompt
        if task is not None and adapter.task_prompts is not None:
            prompt = adapter.task_prompts[task]
        return SwapPlan(adapter, dict(adapter.factors), prompt, task=task)

    def _check_contents(self, adapter: LoadedAdapter) -> None:
        """Factors, base layers and every prompt (each task's, for a multitask adapter)."""
        if self._check_layout(adapter):
            return
        for name, factors in adapter.factors.items():
            self._check_module(adapter, name, factors)
            self._check_values(name, factors, adapter.bounds.get(name))
        if adapter.layout is not None and not adapter.base_layers:
            if len(self._layouts) >= 64:
                self._layouts.clear()
            self._layouts[id(adapter.layout)] = (adapter.layout, _LayoutLimits.of(self, adapter))
        self._check_base_layers(adapter)
        if adapter.prompt is not None:
            self._check_prompt(adapter, adapter.prompt)
        for prompt in [] if adapter.task_prompts is None else adapter.task_prompts:
            self._check_prompt(adapter, prompt)

    @staticmethod
    def _check_task(adapter: LoadedAdapter, task_id: int | None) -> int | None:
        """A multitask prompt serves one of its tasks at a time: the one asked for."""
        tasks = adapter.tasks
        if not tasks:
            if task_id is not None:
                raise UnsupportedAdapter(
                    f"{adapter.source} is a {adapter.kind} adapter, which has no tasks; "
                    "task_id applies to multitask_prompt_tuning adapters"
                )
            return None
        if task_id is None:
            raise UnsupportedAdapter(
                f"{adapter.source} is a multitask_prompt_tuning adapter of {tasks} tasks; "
                f"swap it with task_id= (0 to {tasks - 1}), the task peft's forward takes "
                "as task_ids"
            )
        if isinstance(task_id, bool) or not 0 <= task_id < tasks:
            raise UnsupportedAdapter(
                f"{adapter.source}: task_id {task_id!r} is not one of its {tasks} tasks "
                f"(0 to {tasks - 1})"
            )
        return task_id

    def _check_ia3(self, adapter: LoadedAdapter) -> dict[str, Ia3Scale]:
        """Unmerged IA3: every vector on a slot that holds scales, of its side's size, and
        fitting the slot's dtype."""
        for name, scale in adapter.ia3.items():
            site = self.sites.get(name)
            if site is None:
                raise AdapterShapeMismatch(
                    f"{adapter.source} targets {name}, which has no slot on this host (targets "
                    f"{self.config.targets!r})"
                )
            slot = self.slots.get(name)
            if slot is None or not slot.ia3:
                raise UnsupportedAdapter(
                    f"{adapter.source}: an ia3 adapter in unmerged mode needs IA3 scales on "
                    f"{name}, which this host has not reserved (a host attached with "
                    "ia3=True serves ia3 on linear layers; mode='merged' serves it too)"
                )
            side, size = (
                ("input", site.in_features) if scale.feedforward else ("output", site.out_features)
            )
            if int(scale.vector.numel()) != size:
                raise AdapterShapeMismatch(
                    f"{name}: the adapter's IA3 vector scales {scale.vector.numel()} {side} "
                    f"features, the model's {site.layer} has {size}"
                )
            check_fits(f"{name}.ia3_l", largest(scale.vector), slot.dtype)
        return dict(adapter.ia3)

    def _remember(self, adapter: LoadedAdapter) -> None:
        """Note `adapter` as checked (weakly: the planner keeps no adapter alive)."""
        if len(self._checked) >= 64:
            self._checked = {k: ref for k, ref in self._checked.items() if ref() is not None}
        self._checked[adapter.digest] = weakref.ref(adapter)

    def _peft_modules(self, adapter: LoadedAdapter) -> PeftModules:
        """peft's layers for the adapter on this host's architecture, every one on a site."""
        from peftreg.hotswap.adapter import swap_refusal

        if self.config.mode != "merged":
            raise UnsupportedAdapter(f"{adapter.source}: {swap_refusal(adapter.kind)}")
        if self.model_config is None:
            raise UnsupportedAdapter(
                f"{adapter.source}: a {adapter.kind} adapter is merged by peft on the model's "
                "architecture, and this model has no transformers config"
            )
        from peftreg.merge.errors import MergeError
        from peftreg.merge.peft_modules import PeftModules

        try:
            modules = PeftModules(
                adapter.config, adapter.peft_tensors, self.model_config, adapter.source
            )
        except MergeError as exc:
            raise UnsupportedAdapter(str(exc)) from None
        for name in modules.layers:
            if name not in self.sites:
                raise AdapterShapeMismatch(
                    f"{adapter.source}: its {adapter.kind} layers adapt {name}, which is not "
                    "one of this host's targets (attach the host with targets that include it)"
                )
        return modules

    def _check_base(self, adapter: LoadedAdapter) -> None:
        base = adapter.config.base
        if base.fingerprint and self.base_fingerprint:
            if base.fingerprint != self.base_fingerprint:
                raise BaseMismatch(
                    f"{adapter.source} was made for the base {base.fingerprint}; this host's "
                    f"model is {self.base_fingerprint}"
                )
            return
        known = self.base_structure_hash
        if base.structure_hash and known and base.structure_hash != known:
            raise BaseMismatch(
                f"{adapter.source} was made for a base of structure {base.structure_hash}; "
                f"this host's model has structure {known} (tensor names, dtypes and shapes; "
                "load the base in its registered dtype, or attach with "
                "HostConfig(verify_base='shapes'))"
            )

    def _check_layout(self, adapter: LoadedAdapter) -> bool:
        """True when an adapter of the same layout (modules, shapes, ranks: all decided by
        its config and tensors header) passed here, and this one's values fit too; checked
        at once against the layout's largest gain and gain * rank, with the largest of the
        adapter's value bounds (False: the checks run module by module)."""
        layout = adapter.layout
        known = None if layout is None else self._layouts.get(id(layout))
        if known is None or known[0] is not layout or adapter.base_layers:
            return False
        limits = known[1]
        if limits is None:
            return False
        value = max((max(b.a, b.b, b.bias) for b in adapter.bounds.values()), default=float("nan"))
        dtype = limits.dtype
        fits = value <= dtype_max(dtype)  # (False for NaN)
        return (
            fits
            and limits.gain <= dtype_max(dtype)
            and limits.gain * value <= dtype_max(dtype)
            and limits.delta * value * value <= dtype_max(dtype)
        )

    def _check_module(self, adapter: LoadedAdapter, name: str, factors: ModuleFactors) -> None:
        site = self.sites.get(name)
        if site is None:
            raise AdapterShapeMismatch(
                f"{adapter.source} targets {name}, which has no slot on this host (targets "
                f"{self.config.targets!r})"
            )
        if factors.mora_type is not None:
            self._check_mora(adapter, name, factors, site.layer, site.weight_shape)
            return
        if factors.layer != site.layer or factors.weight_shape != site.weight_shape:
            raise AdapterShapeMismatch(
                f"{name}: the adapter's {factors.layer} delta has shape "
                f"{list(factors.weight_shape)}, the model's {site.layer} weight "
                f"{list(site.weight_shape)}"
            )
        if factors.rank > self.config.max_rank:
            raise RankTooLarge(
                f"{name}: rank {factors.rank} is above the host's max_rank {self.config.max_rank}"
            )
        if self.config.mode == "unmerged":
            if factors.magnitude is not None and not self.config.dora:
                raise UnsupportedAdapter(
                    f"{adapter.source} is DoRA; this host was attached with dora=False"
                )
        elif factors.bias is not None and site.bias is None:
            raise UnsupportedAdapter(f"{name}: the adapter has a lora_B bias, the base none")

    def _check_mora(
        self,
        adapter: LoadedAdapter,
        name: str,
        factors: ModuleFactors,
        layer: str,
        shape: tuple[int, int],
    ) -> None:
        """MoRA merges only (its delta is no low-rank product a slot could hold); its square
        must be the one the fork derives from the model's Linear weight."""
        if self.config.mode != "merged":
            raise UnsupportedAdapter(
                f"{adapter.source}: a mora adapter cannot be hot-swapped in unmerged mode; a "
                "host attached with mode='merged' serves it"
            )
        reason = "a MoRA module adapts a Linear weight" if layer != "linear" else None
        reason = reason or factors.shape_mismatch(shape)
        if reason is not None:
            raise AdapterShapeMismatch(
                f"{name}: the model's {layer} weight {list(shape)}: {reason}"
            )

    def _check_values(self, name: str, factors: ModuleFactors, bounds: FactorBounds | None) -> None:
        """Unmerged: A, B, bias, gain and the delta's largest entry fit the slot's dtype."""
        slot = self.slots.get(name)
        if slot is None:
            return  # merged mode: the merged weights are checked in their dtype
        if bounds is None:  # a hand-made LoadedAdapter
            bounds = FactorBounds(largest(factors.a), largest(factors.b), largest(factors.bias))
        if not bounds.exact:  # upper bounds: refuse only on each tensor's own values
            try:
                self._check_bounds(name, factors, bounds, slot.dtype, slot.output_scale)
                return
            except NonFiniteAdapter:
                bounds = FactorBounds(largest(factors.a), largest(factors.b), largest(factors.bias))
        self._check_bounds(name, factors, bounds, slot.dtype, slot.output_scale)

    @staticmethod
    def _check_bounds(
        name: str,
        factors: ModuleFactors,
        bounds: FactorBounds,
        dtype: torch.dtype,
        output_scale: float,
    ) -> None:
        gain = abs(factors.scaling * output_scale)
        check_fits(f"{name}.lora_A", bounds.a, dtype)
        check_fits(f"{name}.lora_B", bounds.b, dtype)
        check_fits(f"{name}.lora_B.bias", bounds.bias, dtype)
        check_fits(f"{name} scaling", gain, dtype)
        delta = gain * factors.rank * bounds.b * bounds.a
        check_fits(f"{name} delta (scaling * r * |B| * |A|)", delta, dtype)
        check_fits(f"{name} bias delta (scaling * |bias|)", gain * bounds.bias, dtype)

    def _check_base_layers(self, adapter: LoadedAdapter) -> None:
        """A saved embedding base weight must be the host's own (else the adapter replaces it)."""
        if not adapter.base_layers or adapter.digest in self._verified_base_layers:
            return
        for name, saved in adapter.base_layers.items():
            weight = self.base_weight(name)
            if tuple(saved.shape) != tuple(weight.shape) or not torch.equal(
                saved.to(weight.device, weight.dtype), weight
            ):
                raise UnsupportedAdapter(
                    f"{adapter.source} carries its own base weight for {name} (PEFT's "
                    "save_embedding_layers) that differs from this model's (a resized or "
                    "retrained vocabulary); a hot-swap host does not replace base weights"
                )
        self._verified_base_layers.add(adapter.digest)

    def _check_prompt(self, adapter: LoadedAdapter, prompt: torch.Tensor) -> None:
        if self.prompt is None:
            raise UnsupportedAdapter(
                f"{adapter.source} is a soft prompt; attach the host with "
                f"max_virtual_tokens >= {prompt.shape[0]}"
            )
        if prompt.shape[0] > self.prompt.max_tokens:
            raise TooManyVirtualTokens(
                f"{adapter.source} has {prompt.shape[0]} virtual tokens; the host's slot "
                f"holds {self.prompt.max_tokens}"
            )
        if prompt.shape[1] != self.prompt.dim:
            raise AdapterShapeMismatch(
                f"{adapter.source}: virtual tokens of dimension {prompt.shape[1]}, the "
                f"model's embeddings {self.prompt.dim}"
            )
        bound = adapter.prompt_bound or largest(prompt)  # (a hand-made LoadedAdapter)
        check_fits("prompt_embeddings", bound, self.prompt.dtype)

    def dora_rows(self, plan: SwapPlan) -> dict[str, torch.Tensor]:
        """m / ||W + scaling * B @ A|| per output row of each DoRA module (fp32, on the
        slot's device), checked finite, and the gains and row factors staged from them
        checked against the slot's dtype."""
        rows: dict[str, torch.Tensor] = {}
        for name, factors in plan.factors.items():
            if factors.magnitude is None:
                continue
            slot = self.slots[name]
            weight = self.sites[name].weight.detach().to(slot.device, torch.float32)
            delta = delta_weight(factors, slot.device)
            if factors.layer != "linear":
                weight, delta = weight.T, delta.T
            rows[name] = dora_row_scale(weight, delta, factors.magnitude)
        if not rows:
            return rows
        largest = torch.stack([row.abs().max() for row in rows.values()]).tolist()
        for name, value in zip(rows, largest, strict=True):
            if not value < float("inf"):
                raise NonFiniteAdapter(f"DoRA row factors of {name} are not finite")
            slot = self.slots[name]
            gain = abs(plan.factors[name].scaling * slot.output_scale) * value
            check_fits(f"{name} DoRA gain", gain, slot.dtype)
            check_fits(f"{name} DoRA row factor", value + 1.0, slot.dtype)
        return rows
