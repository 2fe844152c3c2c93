"""`MultiAdapterHost`: many adapters resident at once, each batch row on its own (S-LoRA style).

    host = MultiAdapterHost(model, HostConfig(targets="all-linear", max_rank=16,
                                              max_virtual_tokens=8), slots=64, client=client)
    host.load("acme/support-bot:v3", name="support")   # into a free slot (or the LRU one)
    with host.batch(["support", "acme/sql-bot@sha256:...", None, "support"]):
        logits = model(input_ids=ids).logits            # row i runs with adapter i
        model.generate(ids, max_new_tokens=32)          # KV cache per row, same rows
    host.follow(client, "acme/support-bot:prod", name="support")

K slots (`slots`) are preallocated per target module as stacked buffers of
the host's maximum rank (`peftreg.hotswap.multi.stacked`), plus an all-zero
slot for base-only rows; soft prompts per slot likewise
(`peftreg.hotswap.multi.prompt`). A batch names an adapter (a name given to
`load`, a digest, a reference, a directory, a `LoadedAdapter`) or None per
row: what is not resident is loaded (the CPU LRU first, else the disk or the
registry, checked as `AdapterHost` checks a swap), written into a free slot,
or into the least recently used slot no batch reads, then published; the
batch pins its slots for its whole duration and sets the per-row slot index
the hooks read. The low-rank update of every row is computed at once with
gathered batched matmuls, so the cost does not grow with the number of
distinct adapters, and the compiled graph does not change with the mix.

Concurrency: loading writes only a slot no batch reads and publishes it
whole; evicting takes an adapter out of the lookup at once and frees its slot
when the batches pinning it end (`peftreg.hotswap.multi.residency`); neither
waits for, nor is seen half-done by, forwards of other slots. Batches run in
the model one at a time (a batch lock, held by `batch()` and by every
forward outside one, which runs every row on the base model).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from peftreg.digest import Digest
from peftreg.hotswap.adapter import LoadedAdapter
from peftreg.hotswap.attach import base_identity, input_embeddings, slot_device, slot_dtype
from peftreg.hotswap.cache import AdapterCache
from peftreg.hotswap.config import HostConfig
from peftreg.hotswap.errors import HostError, SwapError
from peftreg.hotswap.events import FailureListener, SwapEvent, SwapListener
from peftreg.hotswap.follow import TagFollower
from peftreg.hotswap.loading import AdapterLoader, AdapterSource
from peftreg.hotswap.multi.forward import BatchedForward
from peftreg.hotswap.multi.prompt import StackedPrompt
from peftreg.hotswap.multi.residency import Resident, SlotTable
from peftreg.hotswap.multi.rows import BatchRows
from peftreg.hotswap.multi.stacked import StackedSlot
from peftreg.hotswap.planning import SwapPlanner
from peftreg.hotswap.targets import resolve_targets
from peftreg.reference import Reference
from peftreg.sdk.client import Client
from peftreg.transfer.pull import PullResult

RowAdapter = AdapterSource | None
Fetch = Callable[[], LoadedAdapter]


@dataclass(frozen=True)
class ResidentAdapter:
    """An adapter written into a slot."""

    digest: str
    slot: int
    generation: int  # this use of the slot (a slot reused for another adapter gets a new one)
    bytes_copied: int


@dataclass(frozen=True)
class BatchAssignment:
    """What each row of a batch runs with: digest (None: the base model), slot and the
    generation of the slot's content."""

    digests: tuple[str | None, ...]
    slots: tuple[int, ...]
    generations: tuple[int | None, ...]


class MultiAdapterHost:
    """K resident adapters on a live `nn.Module`, one per batch row; see the module docstring."""

    def __init__(
        self,
        model: nn.Module,
        config: HostConfig | None = None,
        *,
        slots: int = 8,
        client: Client | None = None,
        cache: AdapterCache | None = None,
    ) -> None:
        config = config or HostConfig()
        if config.mode != "unmerged":
            raise HostError("a multi-adapter host runs adapters unmerged (mode='unmerged')")
        self.model = model
        self.config = config
        self.table = SlotTable(slots)
        self.slot_count = slots
        self.cache = cache or AdapterCache(max(config.cache_entries, 2 * slots), config.cache_bytes)
        self.sites = resolve_targets(model, config.targets)
        self.base_fingerprint, self.base_structure_hash = base_identity(model, config)
        devices = {slot_device(config, site.weight) for site in self.sites}
        if len(devices) != 1:
            raise HostError(
                f"the target modules are on {len(devices)} devices; a multi-adapter host "
                "needs them on one"
            )
        device = devices.pop()
        self.device = device
        self.rows = BatchRows.empty(slots, device)
        with torch.no_grad():
            self.stacked = {
                site.name: StackedSlot(
                    site,
                    self.rows,
                    slots,
                    config.max_rank,
                    device,
                    slot_dtype(config, site.weight),
                    dora=config.dora,
                    ia3=config.ia3,
                )
                for site in self.sites
            }
            self.prompt = self._prompt(model, config, slots)
        self.loader = AdapterLoader(self.cache, client=client, pin=device.type == "cuda")
        self.planner = SwapPlanner(
            config,
            self.sites,
            self.stacked,
            self.prompt,
            (self.base_fingerprint, self.base_structure_hash),
            lambda name: self.stacked[name].site.weight,
        )
        self._names: dict[str, tuple[str, AdapterSource]] = {}
        self._names_lock = threading.Lock()
        self._batch_lock = threading.RLock()
        self._local = threading.local()
        self._followers: list[TagFollower] = []
        self._detached = False
        self._forward = BatchedForward(
            model, self.rows, self._batch_lock, self._in_batch, self.prompt
        )
        for slot in self.stacked.values():
            slot.attach()

    @staticmethod
    def _prompt(model: nn.Module, config: HostConfig, slots: int) -> StackedPrompt | None:
        tokens = config.max_virtual_tokens
        if tokens == 0:
            return None
        embedding, weight = input_embeddings(model)
        return StackedPrompt(
            embedding,
            model.forward,
            slots,
            tokens,
            slot_device(config, weight),
            slot_dtype(config, weight),
        )

    def _in_batch(self) -> bool:
        return bool(getattr(self._local, "depth", 0))

    # state ----------------------------------------------------------------------

    @property
    def client(self) -> Client | None:
        return self.loader.client

    @client.setter
    def client(self, client: Client | None) -> None:
        self.loader.client = client

    @property
    def detached(self) -> bool:
        return self._detached

    @property
    def virtual_tokens(self) -> int:
        """Leading positions every output has (0 without soft prompts)."""
        return 0 if self.prompt is None else self.prompt.max_tokens

    @property
    def nbytes(self) -> int:
        """Device bytes of the stacked buffers."""
        total = sum(slot.nbytes() for slot in self.stacked.values())
        return total + (0 if self.prompt is None else self.prompt.nbytes())

    def resident(self) -> dict[str, int]:
        """Digests in a slot now, and their slots, least recently used first."""
        return self.table.resident()

    def bound(self, name: str) -> str | None:
        """The digest a name given to `load` (or followed) points at."""
        with self._names_lock:
            bound = self._names.get(name)
        return None if bound is None else bound[0]

    # loading --------------------------------------------------------------------

    def _check_attached(self) -> None:
        if self._detached:
            raise HostError("the host was detached from its model")

    def prefetch(
        self, sources: Sequence[AdapterSource], *, client: Client | None = None
    ) -> list[str]:
        """Load adapters into the CPU tier (the LRU), checked against this host, without
        taking a slot; their digests. Never blocks forwards: call it from any thread."""
        digests = []
        for source in sources:
            adapter, _cached = self.loader.load(source, client)
            self.planner.plan(adapter)
            self.cache.put(adapter)
            digests.append(adapter.digest)
        return digests

    def load(
        self, source: AdapterSource, *, name: str | None = None, client: Client | None = None
    ) -> ResidentAdapter:
        """Make an adapter resident in a slot (a free one, else the least recently used one
        that no batch reads); with `name`, batches can name it so (a name bound to another
        digest moves: batches in flight keep what they pinned)."""
        self._check_attached()
        adapter, _cached = self.loader.load(source, client)
        entry, written = self._acquire(adapter.digest, lambda: adapter)
        self.table.release([entry])
        if name is not None:
            with self._names_lock:
                self._names[name] = (adapter.digest, self._reload_source(source, adapter))
        return ResidentAdapter(adapter.digest, entry.slot, entry.generation, written)

    @staticmethod
    def _reload_source(source: AdapterSource, adapter: LoadedAdapter) -> AdapterSource:
        """What loads this digest again once it left both the slots and the CPU LRU."""
        if isinstance(source, str | Reference):
            reference = source if isinstance(source, Reference) else Reference.parse(source)
            return Reference(
                reference.repository, digest=reference.digest or Digest.parse(adapter.digest)
            )
        if isinstance(source, Path | PullResult):
            return source
        return adapter

    def evict(self, adapter: str | LoadedAdapter, *, timeout: float | None = None) -> bool:
        """Take an adapter (a name, a digest) out of its slot; returns when no batch reads it
        any more (False: it was not resident). Batches of other slots never wait."""
        digest = adapter.digest if isinstance(adapter, LoadedAdapter) else adapter
        digest = self.bound(digest) or digest
        return self.table.evict(digest, timeout)

    def _acquire(self, digest: str, fetch: Fetch) -> tuple[Resident, int]:
        """Pin `digest`'s slot, writing the adapter into a slot first when not resident;
        (the entry, bytes written)."""
        entry, must_write = self.table.acquire(digest)
        if not must_write:
            return entry, 0
        try:
            self._check_attached()
            adapter = fetch()
            written = self._write(entry.slot, adapter)
            self.cache.put(adapter)
        except BaseException:
            self.table.abandon(entry)
            raise
        self.table.publish(entry)
        return entry, written

    def _write(self, slot: int, adapter: LoadedAdapter) -> int:
        """Check `adapter` and copy it into `slot` (which no batch reads); bytes written."""
        plan = self.planner.plan(adapter)
        written = 0
        with torch.no_grad():
            rows = self.planner.dora_rows(plan)
            self._synchronize()  # a freed slot may still be read by queued GPU work
            for name, stacked in self.stacked.items():
                factors, ia3 = plan.factors.get(name), plan.ia3.get(name)
                written += stacked.write(slot, factors, rows.get(name), ia3)
            if self.prompt is not None:
                written += self.prompt.write(slot, plan.prompt)
            self._synchronize()  # the slot is whole before it is published
        return written

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # batches --------------------------------------------------------------------

    def _resolve(self, key: RowAdapter, client: Client | None) -> tuple[str, Fetch] | None:
        """(digest, how to get the adapter when it must be written into a slot)."""
        if key is None:
            return None
        if isinstance(key, LoadedAdapter):
            return key.digest, lambda: self.loader.load(key, client)[0]
        if isinstance(key, str):
            with self._names_lock:
                bound = self._names.get(key)
            if bound is not None:
                digest, source = bound
                return digest, lambda: self._fetch(source, digest, client)
            cached = self.cache.get(key) if key.startswith("sha256:") else None
            if cached is not None:
                return key, lambda: cached
            if self.table.entry(key) is not None:
                return key, lambda: self._fetch(key, key, client)
        adapter, _cached = self.loader.load(key, client)
        return adapter.digest, lambda: adapter

    def _fetch(self, source: AdapterSource, digest: str, client: Client | None) -> LoadedAdapter:
        hit = self.cache.get(digest)
        if hit is not None:
            return hit
        if source == digest:
            raise SwapError(f"{digest} left the slots and the CPU cache; load it again")
        adapter, _cached = self.loader.load(source, client)
        if adapter.digest != digest:
            raise SwapError(f"{source} now holds {adapter.digest}, not the loaded {digest}")
        return adapter

    @contextmanager
    def batch(
        self, adapters: Sequence[RowAdapter], *, client: Client | None = None
    ) -> Iterator[BatchAssignment]:
        """Run the block's forwards with row i on `adapters[i]` (None: the base model).

        Adapters not resident are loaded first (this may evict the least
        recently used adapter no batch reads; `SlotsBusy` when every slot is
        pinned). The batch pins its slots until the block ends, so every
        forward in it (every step of a `generate`) sees each row's adapter
        whole. One batch runs in the model at a time.
        """
        self._check_attached()
        resolved = [self._resolve(key, client) for key in adapters]
        wanted: dict[str, Fetch] = {}
        for item in resolved:
            if item is not None:
                wanted.setdefault(item[0], item[1])
        entries: dict[str, Resident] = {}
        try:
            for digest, fetch in wanted.items():
                entries[digest], _written = self._acquire(digest, fetch)
            digests = tuple(None if item is None else item[0] for item in resolved)
            slots = tuple(self.slot_count if d is None else entries[d].slot for d in digests)
            assignment = BatchAssignment(
                digests,
                slots,
                tuple(None if d is None else entries[d].generation for d in digests),
            )
            index = torch.tensor(slots, dtype=torch.int64, device=self.device)
            with self._batch_lock:
                self._check_attached()
                previous = self.rows.modules
                self.rows.modules = index
                self._local.depth = getattr(self._local, "depth", 0) + 1
                try:
                    yield assignment
                finally:
                    self._local.depth -= 1
                    self.rows.modules = previous
        finally:
            self.table.release(entries.values())

    # following ------------------------------------------------------------------

    def follow(
        self,
        client: Client,
        reference: str,
        *,
        name: str,
        on_swap: SwapListener | None = None,
        on_error: FailureListener | None = None,
        poll_timeout: float = 30.0,
        start: bool = True,
    ) -> TagFollower:
        """Keep `name` on whatever `reference` (a tag) points at: when it moves, the new
        adapter is loaded into a slot and the name rebound (batches in flight keep the
        slot they pinned). Returns the running follower."""
        follower = TagFollower(
            NameBinding(self, name),
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

    def detach(self, *, follower_timeout: float = 10.0) -> None:
        """Stop followers, remove the hooks and the forward wrapper, release the buffers."""
        if self._detached:
            return
        followers, self._followers = self._followers, []
        for follower in followers:
            follower.stop(timeout=0)
        for follower in followers:
            follower.stop(timeout=follower_timeout)
        with self._batch_lock:
            self._synchronize()
            self._detached = True
            for slot in self.stacked.values():
                slot.detach()
            self._forward.remove()
            self.stacked = {}
            self.planner.slots = {}
            self.prompt = None
            self.planner.prompt = None
            self.table.clear()
            with self._names_lock:
                self._names.clear()

    def __enter__(self) -> MultiAdapterHost:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.detach()


class NameBinding:
    """A name of a multi-adapter host as a tag follower's target: a swap loads the
    adapter into a slot and rebinds the name."""

    def __init__(self, host: MultiAdapterHost, name: str) -> None:
        self.host = host
        self.name = name

    @property
    def active_digest(self) -> str | None:
        return self.host.bound(self.name)

    @property
    def detached(self) -> bool:
        return self.host.detached

    def swap(self, source: AdapterSource, *, client: Client | None = None) -> SwapEvent:
        started = time.perf_counter()
        previous = self.active_digest
        digest = source.digest if isinstance(source, Reference) else None
        cached = digest is not None and str(digest) in self.host.cache
        resident = self.host.load(source, name=self.name, client=client)
        adapter = self.host.cache.get(resident.digest)
        return SwapEvent(
            previous=previous,
            digest=resident.digest,
            reference=str(source),
            kind=None if adapter is None else adapter.kind,
            seconds=time.perf_counter() - started,
            bytes_copied=resident.bytes_copied,
            cached=cached,
        )
