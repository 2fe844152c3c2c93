"""`AdapterHost`: a live model whose adapter is swapped atomically, verified, and cached.

    host = AdapterHost(model, HostConfig(targets=["q_proj", "v_proj"], max_rank=16),
                       client=Client(url))
    host.swap("acme/support-bot:v3")        # pull (or cache), check, stage, flip
    host.swap("acme/multitask:v1", task_id=2)  # a multitask prompt: one of its tasks
    logits = model(input_ids=ids).logits    # forwards run as usual, any thread
    with host.pinned():                     # one adapter for a whole request
        model.generate(ids, max_new_tokens=32)
    host.follow(client, "acme/support-bot:prod", on_swap=print)
    host.unload()

A swap goes: load (the in-memory LRU, else pull or read, and check;
`peftreg.hotswap.loading`) -> plan (base identity, target modules, shapes,
ranks, virtual tokens, values against the slots' dtype; nothing written;
`peftreg.hotswap.planning`) -> the adapter enters the LRU -> DoRA row factors
computed and checked -> stage into the spare buffers -> flip under the
forward gate. An adapter whose factors are already slot-shaped (the host's
max rank and dtype, on the CPU) is not staged: its own tensors become the
slots' active buffers under the gate, and a swap to it copies nothing
(`peftreg.hotswap.resident`). Any failure before the flip leaves the active adapter, and so
the model's outputs, untouched. In merged mode the merged weights are
computed and checked before the gate, and only copied under it (rolled back
from the pristine copy if a copy fails).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from peftreg.adapters.factors import ModuleFactors
from peftreg.hotswap.adapter import LoadedAdapter
from peftreg.hotswap.attach import base_identity, prompt_slot, slot_device, slot_dtype
from peftreg.hotswap.cache import AdapterCache
from peftreg.hotswap.config import HostConfig
from peftreg.hotswap.errors import FlipTimeout, HostError, NonFiniteAdapter
from peftreg.hotswap.events import (
    FailureListener,
    Listeners,
    SwapEvent,
    SwapFailure,
    SwapListener,
)
from peftreg.hotswap.follow import TagFollower
from peftreg.hotswap.gate import ForwardGate, GatedForward
from peftreg.hotswap.loading import AdapterLoader, AdapterSource, source_label
from peftreg.hotswap.merged import PristineWeights
from peftreg.hotswap.planning import EMPTY, SwapPlan, SwapPlanner, content_of
from peftreg.hotswap.prompt import PromptSlot
from peftreg.hotswap.resident import ResidentSets
from peftreg.hotswap.slots import ModuleSlot, SlotBuffers
from peftreg.hotswap.staging import ProgramCache
from peftreg.hotswap.targets import TargetSite, refuse_tied_for_merged, resolve_targets
from peftreg.sdk.client import Client


def _model_config(model: nn.Module) -> dict[str, Any] | None:
    """A transformers model's config.json document (peft builds its layers from it)."""
    config = getattr(model, "config", None)
    to_dict = getattr(config, "to_dict", None)
    return to_dict() if callable(to_dict) else None


__all__ = ["AdapterHost", "AdapterSource", "SwapPlan", "source_label"]


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
        self.cache = cache or AdapterCache(config.cache_entries, config.cache_bytes)
        self.sites = resolve_targets(model, config.targets)
        self._sites: dict[str, TargetSite] = {site.name: site for site in self.sites}
        self.base_fingerprint, self.base_structure_hash = base_identity(model, config)
        self.gate = ForwardGate()
        self._swap_lock = threading.Lock()
        self._listeners = Listeners()
        self._active: LoadedAdapter | None = None
        self._active_task: int | None = None  # a multitask prompt's task
        self._active_factors: dict[str, ModuleFactors] = {}
        self._active_peft: list[str] = []  # merged mode: modules peft's layers merged
        self._spare_content: str | None = EMPTY
        self.slots: dict[str, ModuleSlot] = {}
        self._programs = ProgramCache(2 * (config.cache_entries + 1))  # two buffer sets
        self._residents = ResidentSets()
        self._resident_active = False  # some slot's active set is an adapter's own tensors
        self.pristine: PristineWeights | None = None
        self._followers: list[TagFollower] = []
        self._detached = False
        devices = {site.name: slot_device(config, site.weight) for site in self.sites}
        with torch.no_grad():
            if config.mode == "unmerged":
                for site in self.sites:
                    self.slots[site.name] = ModuleSlot(
                        site,
                        config.max_rank,
                        devices[site.name],
                        slot_dtype(config, site.weight),
                        dora=config.dora,
                        ia3=config.ia3,
                    )
            else:
                refuse_tied_for_merged(model, self.sites)
                self.pristine = PristineWeights(self.sites, config.pristine_device)
            self.prompt: PromptSlot | None = prompt_slot(model, config)
        self._devices = set(devices.values())
        if self.prompt is not None:
            self._devices.add(self.prompt.active.embeds.device)
        pin = any(device.type == "cuda" for device in self._devices)
        self.loader = AdapterLoader(self.cache, client=client, pin=pin)
        self.planner = SwapPlanner(
            config,
            self.sites,
            self.slots,
            self.prompt,
            (self.base_fingerprint, self.base_structure_hash),
            self._base_weight,
            _model_config(model),
        )
        self._forward = GatedForward(
            model, self.gate, self.prompt.transform if self.prompt is not None else None
        )
        for slot in self.slots.values():
            slot.attach()

    # setup ----------------------------------------------------------------------

    def _base_weight(self, name: str) -> torch.Tensor:
        """A target's original weight (merged mode: the pristine copy)."""
        if self.pristine is not None:
            return self.pristine.weights[name]
        return self._sites[name].weight

    # state ----------------------------------------------------------------------

    @property
    def client(self) -> Client | None:
        """The registry client references are resolved and pulled with."""
        return self.loader.client

    @client.setter
    def client(self, client: Client | None) -> None:
        self.loader.client = client

    @property
    def active(self) -> LoadedAdapter | None:
        return self._active

    @property
    def active_digest(self) -> str | None:
        """The digest of the adapter the model runs with now (None: the base model)."""
        active = self._active
        return None if active is None else active.digest

    @property
    def active_task(self) -> int | None:
        """The task of the active multitask prompt (None: the active adapter has no tasks)."""
        return self._active_task

    def _active_content(self) -> str:
        active = self._active
        return EMPTY if active is None else content_of(active.digest, self._active_task)

    @property
    def virtual_tokens(self) -> int:
        """Leading positions the soft-prompt slot adds to every output (0 without one)."""
        return 0 if self.prompt is None else self.prompt.max_tokens

    @property
    def nbytes(self) -> int:
        """Bytes the host reserved: slot buffers, soft-prompt buffers, pristine weights, and
        the constant vectors of resident sets (their factors are the cached adapters')."""
        total = sum(slot.nbytes() for slot in self.slots.values()) + self._residents.nbytes
        total += 0 if self.prompt is None else self.prompt.nbytes()
        return total + (0 if self.pristine is None else self.pristine.nbytes())

    def subscribe(
        self, on_swap: SwapListener | None = None, on_error: FailureListener | None = None
    ) -> Callable[[], None]:
        """Callbacks for every completed / failed swap; returns the unsubscribe function."""
        return self._listeners.subscribe(on_swap, on_error)

    @contextmanager
    def pinned(self) -> Iterator[str | None]:
        """Keep the active adapter for the whole block; yields its digest.

        The block holds the forward gate as a reader: forwards of this thread
        inside it (every step of a `generate`) run freely, and a swap waits
        for the block to end (or gives up after its `flip_timeout`). Use it for
        any request of several forwards, KV-cached generation above all.
        """
        with self.gate.reading():
            yield self.active_digest

    # loading --------------------------------------------------------------------

    def load(
        self, source: AdapterSource, *, client: Client | None = None, task_id: int | None = None
    ) -> LoadedAdapter:
        """Load (or find in the cache) an adapter, check it against this host and keep it
        in the cache, without making it active. Raises SwapError for an adapter the host
        cannot serve (a multitask prompt: checked for `task_id`, by default its first)."""
        adapter, _cached = self.loader.load(source, client)
        if task_id is None and adapter.tasks:
            task_id = 0
        self.planner.plan(adapter, task_id)
        self.cache.put(adapter)
        return adapter

    def plan(self, adapter: LoadedAdapter | None, task_id: int | None = None) -> SwapPlan:
        """Check `adapter` against this host (raises SwapError); nothing is written."""
        return self.planner.plan(adapter, task_id)

    # swapping -------------------------------------------------------------------

    def swap(
        self,
        source: AdapterSource,
        *,
        client: Client | None = None,
        flip_timeout: float | None = None,
        task_id: int | None = None,
    ) -> SwapEvent:
        """Make `source` the active adapter, atomically; see the module docstring.

        Raises SwapError (or the SDK's error for a registry problem) and
        leaves the previous adapter active when anything fails. With
        `flip_timeout`, a flip that cannot start within that many seconds
        (forwards or `pinned()` blocks still running) raises `FlipTimeout`.
        A multitask prompt (multitask_prompt_tuning) serves one task at a
        time: `task_id` picks it (required for one, refused for any other
        adapter); every row of every forward then runs with that task's
        virtual tokens, as peft's forward with `task_ids` of that task.
        Swapping the same adapter with another task stages that task's prompt.
        """
        started = time.perf_counter()
        label = source_label(source)
        try:
            self._check_attached()
            adapter, cached = self.loader.load(source, client)
            label = adapter.source
            event = self._apply(adapter, label, started, cached, flip_timeout, task_id)
        except Exception as exc:
            failure = _naming_the_adapter(exc, label)
            self._listeners.failed(SwapFailure(label, self.active_digest, failure))
            if failure is exc:
                raise
            raise failure from exc
        self._listeners.swapped(event)
        return event

    def unload(self, *, flip_timeout: float | None = None) -> SwapEvent:
        """Back to the base model (merged mode: weights restored bitwise)."""
        started = time.perf_counter()
        try:
            self._check_attached()
            event = self._apply(None, None, started, False, flip_timeout, None)
        except Exception as exc:
            self._listeners.failed(SwapFailure(None, self.active_digest, exc))
            raise
        self._listeners.swapped(event)
        return event

    def _check_attached(self) -> None:
        if self._detached:
            raise HostError("the host was detached from its model")

    def _apply(
        self,
        adapter: LoadedAdapter | None,
        label: str | None,
        started: float,
        cached: bool,
        flip_timeout: float | None,
        task_id: int | None,
    ) -> SwapEvent:
        with self._swap_lock:
            self._check_attached()  # detach() may have run while the adapter loaded
            previous = self.active_digest
            target = EMPTY if adapter is None else content_of(adapter.digest, task_id)
            if target == self._active_content():
                return self._event(previous, adapter, label, started, 0, cached)
            plan = self.planner.plan(adapter, task_id)
            try:
                if self.pristine is not None:
                    written = self._apply_merged(plan, flip_timeout)
                else:
                    written = self._apply_unmerged(plan, flip_timeout)
            except FlipTimeout:
                self._keep(adapter)  # a good adapter: a retry needs no download
                raise
            finally:
                self._prune()
            self._keep(adapter)
            self._prune()
            return self._event(previous, adapter, label, started, written, cached)

    def _keep(self, adapter: LoadedAdapter | None) -> None:
        if adapter is not None:
            self.cache.put(adapter)

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
            task_id=self._active_task,
        )

    def _synchronize(self) -> None:
        """Wait for queued GPU work (forwards that may read what is written, staging copies)."""
        for device in self._devices:
            if device.type == "cuda":
                torch.cuda.synchronize(device)

    def _prune(self) -> None:
        self._programs.prune(self._keeps_program)
        self._residents.prune(self._keeps_program)

    def _resident_sets(self, plan: SwapPlan) -> dict[str, SlotBuffers] | None:
        """The adapter's own tensors as the slots' buffers, when every factor is slot-shaped."""
        if plan.adapter is None or not plan.factors or plan.ia3:
            return None
        return self._residents.sets(plan.adapter, plan.factors, self.slots)

    def _apply_unmerged(self, plan: SwapPlan, flip_timeout: float | None) -> int:
        residents = self._resident_sets(plan)
        if residents is not None:
            return self._show_resident(plan, residents, flip_timeout)
        written = 0
        with torch.no_grad():
            if self._spare_content != plan.content:
                rows = self.planner.dora_rows(plan)
                self._synchronize()
                self._spare_content = None
                for name, slot in self.slots.items():
                    factors, ia3 = plan.factors.get(name), plan.ia3.get(name)
                    written += slot.stage(factors, rows.get(name), ia3, copy_factors=False)
                if plan.adapter is not None and plan.factors:
                    program = self._programs.program(plan.adapter, plan.factors, self.slots)
                    written += program.run()
                if self.prompt is not None:
                    written += self.prompt.stage(plan.prompt)
                self._spare_content = plan.content
            self._synchronize()
            # after a resident set, a slot's spare is the set that was neither: unknown
            previous = None if self._resident_active else self._active_content()
            with self.gate.exclusive(flip_timeout):
                for slot in self.slots.values():
                    slot.flip()
                if self.prompt is not None:
                    self.prompt.flip()
                self._now_serving(plan)
                self._spare_content = previous
                self._resident_active = False
        return written

    def _show_resident(
        self, plan: SwapPlan, residents: dict[str, SlotBuffers], flip_timeout: float | None
    ) -> int:
        """Make the adapter's own tensors the targeted slots' buffers; the other slots (and
        the soft prompt) are staged empty and flipped, all under one gate."""
        written = 0
        with torch.no_grad():
            self._spare_content = None  # the spares of the other slots change
            for name, slot in self.slots.items():
                if name not in residents:
                    written += slot.stage(None, None, None)
            if self.prompt is not None:
                written += self.prompt.stage(plan.prompt)
            self._synchronize()
            with self.gate.exclusive(flip_timeout):
                for name, slot in self.slots.items():
                    buffers = residents.get(name)
                    if buffers is None:
                        slot.flip()
                    else:
                        slot.show(buffers)
                if self.prompt is not None:
                    self.prompt.flip()
                self._now_serving(plan)
                self._resident_active = True
        return written

    def _keeps_program(self, digest: str) -> bool:
        """A staging program stays while its adapter is in the LRU or active."""
        return digest in self.cache or digest == self.active_digest

    def _apply_merged(self, plan: SwapPlan, flip_timeout: float | None) -> int:
        pristine = self.pristine
        assert pristine is not None
        written = 0
        with torch.no_grad():
            # checked; nothing live touched yet
            if plan.peft is not None:
                merged = pristine.compute_peft(plan.peft)
            else:
                merged = pristine.compute(plan.factors)
            if self.prompt is not None:
                written += self.prompt.stage(plan.prompt)
            self._synchronize()
            with self.gate.exclusive(flip_timeout):
                self._synchronize()  # forwards queued before the gate closed read the weights
                before = self._active_factors
                try:
                    written += pristine.write(merged, [*before, *self._active_peft])
                except BaseException:
                    self._roll_back(pristine, before)
                    raise
                if self.prompt is not None:
                    self.prompt.flip()
                self._now_serving(plan)
                self._active_peft = sorted(merged) if plan.peft is not None else []
        return written

    def _now_serving(self, plan: SwapPlan) -> None:
        """Record the adapter (task, factors) a flip just made active; under the gate."""
        self._active = plan.adapter
        self._active_task = plan.task
        self._active_factors = dict(plan.factors)

    def _roll_back(self, pristine: PristineWeights, before: dict[str, ModuleFactors]) -> None:
        """After a failed write: the previous adapter again, else the base model."""
        if self._active_peft:  # peft's layers merge once: back to the base model
            self._active, self._active_task = None, None
            self._active_peft = []
            pristine.restore_all()
            return
        try:
            pristine.restore_all()
            pristine.write(pristine.compute(before), ())
        except BaseException:
            self._active, self._active_task = None, None
            self._active_factors = {}
            pristine.restore_all()

    # following ------------------------------------------------------------------

    def follow(
        self,
        client: Client,
        reference: str,
        *,
        on_swap: SwapListener | None = None,
        on_error: FailureListener | None = None,
        poll_timeout: float = 30.0,
        min_backoff: float = 0.5,
        max_backoff: float = 30.0,
        start: bool = True,
        task_id: int | None = None,
    ) -> TagFollower:
        """Swap to what `reference` (a tag, e.g. "acme/bot:prod") points at, whenever it moves
        (a multitask prompt: its task `task_id`, as `swap`).

        Returns the running follower; `stop()` it (or detach the host) to end.
        """
        follower = TagFollower(
            self if task_id is None else _TaskTarget(self, task_id),
            client,
            reference,
            on_swap=on_swap,
            on_error=on_error,
            poll_timeout=poll_timeout,
            min_backoff=min_backoff,
            max_backoff=max_backoff,
        )
        if start:
            follower.start()
        self._followers.append(follower)
        return follower

    # detaching ------------------------------------------------------------------

    @property
    def detached(self) -> bool:
        return self._detached

    def detach(self, *, follower_timeout: float = 10.0) -> None:
        """Remove hooks and the forward gate; merged mode restores the base weights.

        Followers are stopped first (each joined for up to `follower_timeout`
        seconds; one still loading an adapter then finds the host detached
        and swaps nothing). Slot buffers, pristine weights and soft-prompt
        buffers are released; the cache is kept (it may be shared).
        """
        if self._detached:
            return
        followers, self._followers = self._followers, []
        for follower in followers:
            follower.stop(timeout=0)  # all of them stop at once ...
        for follower in followers:
            follower.stop(timeout=follower_timeout)  # ... then each is joined
        with self._swap_lock, self.gate.exclusive():
            self._synchronize()
            if self.pristine is not None:
                self.pristine.restore_all()
            for slot in self.slots.values():
                slot.detach()
            self._forward.remove()
            self._active = None
            self._active_task = None
            self._active_factors = {}
            self._active_peft = []
            self._detached = True
            self.slots.clear()  # the planner holds the same dict
            self._programs.clear()
            self._residents.clear()
            self._resident_active = False
            self.pristine = None
            self.prompt = None
            self.planner.prompt = None

    def __enter__(self) -> AdapterHost:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.detach()


class _TaskTarget:
    """A host as a tag follower's target that swaps in one task of a multitask prompt."""

    def __init__(self, host: AdapterHost, task_id: int) -> None:
        self.host = host
        self.task_id = task_id

    @property
    def active_digest(self) -> str | None:
        return self.host.active_digest

    @property
    def detached(self) -> bool:
        return self.host.detached

    def swap(self, source: AdapterSource, *, client: Client | None = None) -> SwapEvent:
        return self.host.swap(source, client=client, task_id=self.task_id)


def _naming_the_adapter(exc: Exception, label: str | None) -> Exception:
    """A refusal of the adapter's values names the adapter, not only the module."""
    if isinstance(exc, NonFiniteAdapter) and label and label not in exc.message:
        return NonFiniteAdapter(f"{label}: {exc.message}")
    return exc
