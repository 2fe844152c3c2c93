"""`AdapterHost`: a live model whose adapter is swapped atomically, verified, and cached.

    host = AdapterHost(model, HostConfig(targets=["q_proj", "v_proj"], max_rank=16),
                       client=Client(url))
    host.swap("acme/support-bot:v3")        # pull (or cache), check, stage, flip
    logits = model(input_ids=ids).logits    # forwards run as usual, any thread
    host.follow(client, "acme/support-bot:prod", on_swap=print)
    host.unload()

A swap goes: load (the in-memory LRU, else pull and parse on the CPU) ->
plan (base identity, target modules, shapes, ranks, virtual tokens; nothing
written yet) -> DoRA row factors computed and checked finite -> stage into
the spare buffers -> flip under the forward gate. Any failure before the flip
leaves the active adapter, and so the model's outputs, untouched. In merged
mode the weights are rewritten under the gate from their pristine copy and
rolled back if a module's merge is not finite.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from client.adapters.factors import ModuleFactors, delta_weight, dora_row_scale
from client.hotswap.adapter import LoadedAdapter, adapter_from_directory, adapter_from_pull
from client.hotswap.base import module_fingerprint
from client.hotswap.cache import AdapterCache
from client.hotswap.config import HostConfig
from client.hotswap.errors import (
    AdapterShapeMismatch,
    BaseMismatch,
    HostError,
    NonFiniteAdapter,
    RankTooLarge,
    TooManyVirtualTokens,
    UnsupportedAdapter,
)
from client.hotswap.events import (
    FailureListener,
    Listeners,
    SwapEvent,
    SwapFailure,
    SwapListener,
)
from client.hotswap.follow import TagFollower
from client.hotswap.gate import ForwardGate, GatedForward
from client.hotswap.merged import PristineWeights
from client.hotswap.prompt import PromptSlot
from client.hotswap.slots import ModuleSlot
from client.hotswap.targets import TargetSite, resolve_targets
from client.reference import Reference
from client.sdk.client import Client
from client.transfer.pull import PullResult

AdapterSource = str | Reference | PullResult | Path | LoadedAdapter
EMPTY = "empty"  # what the spare buffers hold after an unload was staged in them


@dataclass(frozen=True)
class SwapPlan:
    """A checked swap: what each slot gets (absent: nothing)."""

    adapter: LoadedAdapter | None
    factors: dict[str, ModuleFactors] = field(default_factory=dict)
    prompt: torch.Tensor | None = None

    @property
    def content(self) -> str:
        return EMPTY if self.adapter is None else self.adapter.digest


class AdapterHost:
    """Adapter slots attached to a live `nn.Module`; see the module docstring."""

    def __init__(
        self,
        model: nn.Module,
        config: HostConfig | None = None,
        *,
        client: Client | None = None,
        cache: AdapterCache | None = None,
    ) -> None:
        self.model = model
        self.config = config = config or HostConfig()
        self.client = client
        self.cache = cache or AdapterCache(config.cache_entries, config.cache_bytes)
        self.sites = resolve_targets(model, config.targets)
        self._sites: dict[str, TargetSite] = {site.name: site for site in self.sites}
        self.base_fingerprint, self.base_structure_hash = self._base_identity()
        self.gate = ForwardGate()
        self._swap_lock = threading.Lock()
        self._listeners = Listeners()
        self._active: LoadedAdapter | None = None
        self._active_factors: dict[str, ModuleFactors] = {}
        self._spare_content: str | None = EMPTY
        self.slots: dict[str, ModuleSlot] = {}
        self.pristine: PristineWeights | None = None
        self._followers: list[TagFollower] = []
        self._detached = False
        devices = {site.name: self._device_of(site.weight) for site in self.sites}
        with torch.no_grad():
            if config.mode == "unmerged":
                for site in self.sites:
                    slot = ModuleSlot(
                        site,
                        config.max_rank,
                        devices[site.name],
                        self._dtype_of(site.weight),
                        dora=config.dora,
                    )
                    self.slots[site.name] = slot
            else:
                self.pristine = PristineWeights(self.sites, config.pristine_device)
            self.prompt = self._prompt_slot()
        self._pin = any(site.weight.device.type == "cuda" for site in self.sites)
        self._forward = GatedForward(
            model, self.gate, self.prompt.transform if self.prompt is not None else None
        )
        for slot in self.slots.values():
            slot.attach()

    # setup ----------------------------------------------------------------------

    def _device_of(self, weight: torch.Tensor) -> torch.device:
        """The weight's device; a configured device must be the same one."""
        wanted = self.config.device
        if wanted is not None:
            device = torch.device(wanted)
            if device.type != weight.device.type or (
                device.index is not None and device.index != weight.device.index
            ):
                raise HostError(
                    f"the host's device is {device} but the model's weights are on "
                    f"{weight.device}; move the model before attaching"
                )
        return weight.device

    def _dtype_of(self, weight: torch.Tensor) -> torch.dtype:
        if self.config.dtype is not None:
            return self.config.dtype
        return weight.dtype if weight.dtype.is_floating_point else torch.float32

    def _base_identity(self) -> tuple[str | None, str | None]:
        config = self.config
        fingerprint, structure = config.base_fingerprint, config.base_structure_hash
        if config.verify_base == "fingerprint" and fingerprint is None:
            computed = module_fingerprint(self.model)
            return computed.fingerprint, structure or computed.structure_hash
        if config.verify_base in ("fingerprint", "structure") and structure is None:
            structure = module_fingerprint(self.model, content=False).structure_hash
        return fingerprint, structure

    def _prompt_slot(self) -> PromptSlot | None:
        tokens = self.config.max_virtual_tokens
        if tokens == 0:
            return None
        getter = getattr(self.model, "get_input_embeddings", None)
        embedding = getter() if callable(getter) else None
        if not isinstance(embedding, nn.Module):
            raise HostError(
                f"{type(self.model).__name__} has no get_input_embeddings(); a soft-prompt slot "
                "needs the model's input embedding layer"
            )
        weight = embedding.weight
        assert isinstance(weight, torch.Tensor)
        return PromptSlot(
            embedding, self.model.forward, tokens, self._device_of(weight), self._dtype_of(weight)
        )

    # state ----------------------------------------------------------------------

    @property
    def active(self) -> LoadedAdapter | None:
        return self._active

    @property
    def active_digest(self) -> str | None:
        """The digest of the adapter the model runs with now (None: the base model)."""
        active = self._active
        return None if active is None else active.digest

    @property
    def virtual_tokens(self) -> int:
        """Leading positions the soft-prompt slot adds to every output (0 without one)."""
        return 0 if self.prompt is None else self.prompt.max_tokens

    @property
    def nbytes(self) -> int:
        """Bytes the host reserved: slot buffers, soft-prompt buffers, pristine weights."""
        total = sum(slot.nbytes() for slot in self.slots.values())
        total += 0 if self.prompt is None else self.prompt.nbytes()
        return total + (0 if self.pristine is None else self.pristine.nbytes())

    def subscribe(
        self, on_swap: SwapListener | None = None, on_error: FailureListener | None = None
    ) -> Callable[[], None]:
        """Callbacks for every completed / failed swap; returns the unsubscribe function."""
        return self._listeners.subscribe(on_swap, on_error)

    # loading --------------------------------------------------------------------

    def load(self, source: AdapterSource, *, client: Client | None = None) -> LoadedAdapter:
        """Load (or find in the cache) an adapter without making it active."""
        return self._load(source, client)[0]

    def _load(self, source: AdapterSource, client: Client | None) -> tuple[LoadedAdapter, bool]:
        if isinstance(source, LoadedAdapter):
            cached = source.digest in self.cache
            adapter = self.cache.get(source.digest) or self._keep(source)
            return adapter, cached
        if isinstance(source, PullResult):
            hit = self.cache.get(str(source.digest))
            return (hit, True) if hit else (self._keep(adapter_from_pull(source)), False)
        if isinstance(source, Path):
            return self._keep(adapter_from_directory(source)), False
        reference = source if isinstance(source, Reference) else Reference.parse(source)
        registry = client or self.client
        digest = reference.digest
        if digest is None:
            if registry is None:
                raise HostError(f"loading {reference} needs a Client (AdapterHost(client=...))")
            digest = registry.resolve(reference)
        hit = self.cache.get(str(digest))
        if hit is not None:
            return hit, True
        if registry is None:
            raise HostError(f"{reference} is not cached and no Client was given to pull it")
        result = registry.pull(Reference(reference.repository, digest=digest))
        return self._keep(adapter_from_pull(result, source=str(reference))), False

    def _keep(self, adapter: LoadedAdapter) -> LoadedAdapter:
        if self._pin and adapter.factors and not next(iter(adapter.factors.values())).a.is_pinned():
            adapter = adapter.pin_memory()
        self.cache.put(adapter)
        return adapter

    # planning -------------------------------------------------------------------

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
        site = self._sites.get(name)
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

    def plan(self, adapter: LoadedAdapter | None) -> SwapPlan:
        """Check `adapter` against this host (raises SwapError); nothing is written."""
        if adapter is None:
            return SwapPlan(None)
        self._check_base(adapter)
        for name, factors in adapter.factors.items():
            self._check_module(adapter, name, factors)
        prompt = adapter.prompt
        if prompt is not None:
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
        return SwapPlan(adapter, dict(adapter.factors), prompt)

    # swapping -------------------------------------------------------------------

    def swap(self, source: AdapterSource, *, client: Client | None = None) -> SwapEvent:
        """Make `source` the active adapter, atomically; see the module docstring.

        Raises SwapError (or the SDK's error for a registry problem) and
        leaves the previous adapter active when anything fails.
        """
        started = time.perf_counter()
        label = source_label(source)
        try:
            self._check_attached()
            adapter, cached = self._load(source, client)
            label = adapter.source
            event = self._apply(adapter, label, started, cached)
        except Exception as exc:
            self._listeners.failed(SwapFailure(label, self.active_digest, exc))
            raise
        self._listeners.swapped(event)
        return event

    def unload(self) -> SwapEvent:
        """Back to the base model (merged mode: weights restored bitwise)."""
        started = time.perf_counter()
        try:
            self._check_attached()
            event = self._apply(None, None, started, False)
        except Exception as exc:
            self._listeners.failed(SwapFailure(None, self.active_digest, exc))
            raise
        self._listeners.swapped(event)
        return event

    def _check_attached(self) -> None:
        if self._detached:
            raise HostError("the host was detached from its model")

    def _apply(
        self, adapter: LoadedAdapter | None, label: str | None, started: float, cached: bool
    ) -> SwapEvent:
        with self._swap_lock:
            previous = self.active_digest
            target = None if adapter is None else adapter.digest
            if target == previous:
                return self._event(previous, adapter, label, started, 0, cached)
            plan = self.plan(adapter)
            if self.pristine is not None:
                written = self._apply_merged(plan)
            else:
                written = self._apply_unmerged(plan)
            return self._event(previous, adapter, label, started, written, cached)

    def _event(
        self,
        previous: str | None,
        adapter: LoadedAdapter | None,
        label: str | None,
        started: float,
        written: int,
        cached: bool,
    ) -> SwapEvent:
        return SwapEvent(
            previous=previous,
            digest=None if adapter is None else adapter.digest,
            reference=label,
            kind=None if adapter is None else adapter.kind,
            seconds=time.perf_counter() - started,
            bytes_copied=written,
            cached=cached,
        )

    def _synchronize(self) -> None:
        """Wait for queued GPU work (forwards that may read the spare, staging copies)."""
        devices = {slot.device for slot in self.slots.values()}
        if self.prompt is not None:
            devices.add(self.prompt.active.embeds.device)
        for device in devices:
            if device.type == "cuda":
                torch.cuda.synchronize(device)

    def _dora_rows(self, plan: SwapPlan) -> dict[str, torch.Tensor]:
        """m / ||W + scaling * B @ A|| per output row of each DoRA module, fp32, checked."""
        rows: dict[str, torch.Tensor] = {}
        for name, factors in plan.factors.items():
            if factors.magnitude is None:
                continue
            slot = self.slots[name]
            weight = self._sites[name].weight.detach().to(slot.device, torch.float32)
            delta = delta_weight(factors, slot.device)
            if factors.layer != "linear":
                weight, delta = weight.T, delta.T
            rows[name] = dora_row_scale(weight, delta, factors.magnitude)
        if rows and not bool(torch.stack([torch.isfinite(r).all() for r in rows.values()]).all()):
            bad = sorted(name for name, row in rows.items() if not bool(torch.isfinite(row).all()))
            raise NonFiniteAdapter(f"DoRA row factors of {', '.join(bad)} are not finite")
        return rows

    def _apply_unmerged(self, plan: SwapPlan) -> int:
        written = 0
        with torch.no_grad():
            if self._spare_content != plan.content:
                rows = self._dora_rows(plan)
                self._synchronize()
                self._spare_content = None
                for name, slot in self.slots.items():
                    written += slot.stage(plan.factors.get(name), rows.get(name))
                if self.prompt is not None:
                    written += self.prompt.stage(plan.prompt)
                self._spare_content = plan.content
            self._synchronize()
            previous = EMPTY if self._active is None else self._active.digest
            with self.gate.exclusive():
                for slot in self.slots.values():
                    slot.flip()
                if self.prompt is not None:
                    self.prompt.flip()
                self._active = plan.adapter
                self._active_factors = plan.factors
                self._spare_content = previous
        return written

    def _apply_merged(self, plan: SwapPlan) -> int:
        pristine = self.pristine
        assert pristine is not None
        written = 0
        with torch.no_grad():
            if self.prompt is not None:
                written += self.prompt.stage(plan.prompt)
            self._synchronize()
            with self.gate.exclusive():
                before = self._active_factors
                try:
                    written += pristine.apply(plan.factors, before)
                except BaseException:
                    pristine.restore_all()
                    pristine.apply(before, ())
                    raise
                if self.prompt is not None:
                    self.prompt.flip()
                self._active = plan.adapter
                self._active_factors = plan.factors
        return written

    # following ------------------------------------------------------------------

    def follow(
        self,
        client: Client,
        reference: str,
        *,
        on_swap: SwapListener | None = None,
        on_error: FailureListener | None = None,
        poll_timeout: float = 30.0,
        start: bool = True,
    ) -> TagFollower:
        """Swap to what `reference` (a tag, e.g. "acme/bot:prod") points at, whenever it moves.

        Returns the running follower; `stop()` it (or detach the host) to end.
        """
        follower = TagFollower(
            self,
            client,
            reference,
            on_swap=on_swap,
            on_error=on_error,
            poll_timeout=poll_timeout,
        )
        if start:
            follower.start()
        self._followers.append(follower)
        return follower

    # detaching ------------------------------------------------------------------

    @property
    def detached(self) -> bool:
        return self._detached

    def detach(self) -> None:
        """Remove hooks and the forward gate; merged mode restores the base weights.

        Followers are told to stop (they end after their current long-poll).
        """
        if self._detached:
            return
        for follower in self._followers:
            follower.stop(timeout=0)
        with self._swap_lock, self.gate.exclusive():
            if self.pristine is not None:
                self.pristine.restore_all()
            for slot in self.slots.values():
                slot.detach()
            self._forward.remove()
            self._active = None
            self._active_factors = {}
            self._detached = True

    def __enter__(self) -> AdapterHost:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.detach()


def source_label(source: AdapterSource) -> str:
    """How a source is named in events and errors."""
    if isinstance(source, LoadedAdapter):
        return source.source
    if isinstance(source, PullResult):
        return str(source.reference)
    return str(source)
