"""Planning a swap: an adapter checked against one host before anything is written.

`SwapPlanner.plan` checks the base identity the adapter records, that every
module it targets has a slot of the right layer kind and shape, the ranks,
the virtual tokens, the saved embedding base layers, and that every value
staged fits the dtype it is staged in: a value finite in fp32 can be
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

    @property
    def content(self) -> str:
        return EMPTY if self.adapter is None else self.adapter.digest


def dtype_max(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max)


def check_fits(what: str, value: float, dtype: torch.dtype) -> None:
    """Refuse `value` (a largest magnitude) that is not finite in `dtype`."""
    if not value <= dtype_max(dtype):  # also refuses NaN
        raise NonFiniteAdapter(
            f"{what}: a value of magnitude {value:.3g} overflows {dtype} (max "
            f"{dtype_max(dtype):.3g}); refusing the adapter"
        )


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

    def plan(self, adapter: LoadedAdapter | None) -> SwapPlan:
        """Check `adapter` against this host (raises SwapError); nothing is written."""
        if adapter is None:
            return SwapPlan(None)
        self._check_base(adapter)
        if adapter.peft_tensors:
            return SwapPlan(adapter, peft=self._peft_modules(adapter))
        checked = self._checked.get(adapter.digest)
        if checked is None or checked() is not adapter:
            self._check_contents(adapter)
            self._remember(adapter)
        return SwapPlan(adapter, dict(adapter.factors), adapter.prompt)

    def _check_contents(self, adapter: LoadedAdapter) -> None:
        for name, factors in adapter.factors.items():
            self._check_module(adapter, name, factors)
            self._check_values(name, factors, adapter.bounds.get(name))
        self._check_base_layers(adapter)
        prompt = adapter.prompt
        if prompt is not None:
            self._check_prompt(adapter, prompt)

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

    def _check_module(self, adapter: LoadedAdapter, name: str, factors: ModuleFactors) -> None:
        site = self.sites.get(name)
        if site is None:
            raise AdapterShapeMismatch(
                f"{adapter.source} targets {name}, which has no slot on this host (targets "
                f"{self.config.targets!r})"
            )
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

    def _check_values(self, name: str, factors: ModuleFactors, bounds: FactorBounds | None) -> None:
        """Unmerged: A, B, bias, gain and the delta's largest entry fit the slot's dtype."""
        slot = self.slots.get(name)
        if slot is None:
            return  # merged mode: the merged weights are checked in their dtype
        if bounds is None:  # a hand-made LoadedAdapter
            bounds = FactorBounds(largest(factors.a), largest(factors.b), largest(factors.bias))
        dtype = slot.dtype
        gain = abs(factors.scaling * slot.output_scale)
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
