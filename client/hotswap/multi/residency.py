"""`SlotTable`: which adapter each of K device slots holds, who reads it, and what goes next.

Every slot is free, or holds one adapter (by digest) in one of three states:

- loading: reserved by a loader that writes the adapter into it; no batch
  reads it yet (a batch asking for the same digest waits for it to be ready);
- ready: published; batches pin it for their whole duration;
- draining: evicted while batches still pin it; no new batch can pin it (a
  new request for the digest loads it into another slot), and the slot is
  freed when its last pin is released.

Every change happens under one condition variable and is published to the
readers of the table at once. Loading into a slot never waits for batches
(it only takes a free slot, or the least recently used ready slot that no
batch pins); an eviction waits only for the batches that pin that slot.
Each (re)use of a slot gets a new generation number, so a batch's
assignment names exactly the content it read.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

from peftreg.hotswap.errors import FlipTimeout, HostError

SlotState = Literal["loading", "ready", "draining"]


class SlotsBusy(HostError):
    """Every slot is pinned by a batch in flight or being loaded; none can take an adapter."""


@dataclass
class Resident:
    """One slot's content: an adapter's digest, its state and the batches that pin it."""

    digest: str
    slot: int
    generation: int
    state: SlotState = "loading"
    pins: int = 0


class SlotTable:
    """The residency of `count` slots; thread-safe; see the module docstring."""

    def __init__(self, count: int) -> None:
        if count < 1:
            raise HostError(f"a multi-adapter host needs at least 1 slot, not {count}")
        self.count = count
        self._condition = threading.Condition()
        self._slots: list[Resident | None] = [None] * count
        self._by_digest: dict[str, Resident] = {}
        self._recent: OrderedDict[str, None] = OrderedDict()  # ready, least recently used first
        self._generation = 0
        self.evictions = 0  # adapters dropped from a slot to make room (LRU)

    def acquire(self, digest: str) -> tuple[Resident, bool]:
        """Pin `digest`'s slot: (its entry, False) when resident and ready; (a reserved
        entry, True) when the caller must write the adapter into `entry.slot` and then
        `publish` it (or `abandon` it on failure). Waits while another thread loads it."""
        with self._condition:
            while True:
                entry = self._by_digest.get(digest)
                if entry is None:
                    entry = self._reserve(digest)
                    entry.pins += 1
                    return entry, True
                if entry.state == "ready":
                    entry.pins += 1
                    self._recent.move_to_end(digest)
                    return entry, False
                self._condition.wait()  # loading in another thread

    def _reserve(self, digest: str) -> Resident:
        slot = next((index for index, item in enumerate(self._slots) if item is None), None)
        if slot is None:
            victim = next(
                (d for d in self._recent if self._by_digest[d].pins == 0),
                None,
            )
            if victim is None:
                raise SlotsBusy(
                    f"all {self.count} adapter slots are pinned by batches in flight or "
                    "being loaded; attach the host with more slots or use fewer distinct "
                    "adapters at once"
                )
            slot = self._drop(victim).slot
            self._slots[slot] = None
            self.evictions += 1
        self._generation += 1
        entry = Resident(digest, slot, self._generation)
        self._slots[slot] = entry
        self._by_digest[digest] = entry
        return entry

    def _drop(self, digest: str) -> Resident:
        """Remove `digest` from the lookup (its slot stays taken until freed)."""
        entry = self._by_digest.pop(digest)
        self._recent.pop(digest, None)
        return entry

    def publish(self, entry: Resident) -> None:
        """The reserved slot holds its adapter whole: batches may read it."""
        with self._condition:
            if entry.state == "loading":
                entry.state = "ready"
                self._recent[entry.digest] = None
            self._condition.notify_all()

    def abandon(self, entry: Resident) -> None:
        """Writing the reserved slot failed: forget it and free the slot."""
        with self._condition:
            if self._by_digest.get(entry.digest) is entry:
                self._drop(entry.digest)
            entry.state = "draining"
            entry.pins -= 1
            self._free_if_drained(entry)
            self._condition.notify_all()

    def release(self, entries: Iterable[Resident]) -> None:
        """A batch (or a load) ends: unpin its slots; drained evicted slots are freed."""
        with self._condition:
            for entry in entries:
                entry.pins -= 1
                self._free_if_drained(entry)
            self._condition.notify_all()

    def _free_if_drained(self, entry: Resident) -> None:
        if entry.state == "draining" and entry.pins == 0 and self._slots[entry.slot] is entry:
            self._slots[entry.slot] = None

    def evict(self, digest: str, timeout: float | None = None) -> bool:
        """Take `digest` out of its slot: no new batch can pin it from now on, and the call
        returns when the batches that pin it have ended (False: it was not resident).
        With `timeout`, raises `FlipTimeout` when they have not ended by then (the
        adapter stays evicted; its slot is freed when they end)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._condition:
            entry = self._by_digest.get(digest)
            if entry is None:
                return False
            self._drop(digest)
            entry.state = "draining"
            self._free_if_drained(entry)
            self._condition.notify_all()
            while self._slots[entry.slot] is entry:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise FlipTimeout(
                        f"{digest} is still read by {entry.pins} batch(es) after {timeout} s; "
                        "its slot is freed when they end"
                    )
                self._condition.wait(left)
            return True

    def entry(self, digest: str) -> Resident | None:
        """The ready or loading entry of `digest` (None: not resident)."""
        with self._condition:
            return self._by_digest.get(digest)

    def resident(self) -> dict[str, int]:
        """Ready digests and their slots, least recently used first."""
        with self._condition:
            return {digest: self._by_digest[digest].slot for digest in self._recent}

    def wait_for(self, predicate: Callable[[SlotTable], bool], timeout: float | None) -> bool:
        """Wait until `predicate(self)` holds after some change of the table (True), or the
        timeout passes (False); for callers that coordinate with loads and evictions."""
        with self._condition:
            return self._condition.wait_for(lambda: predicate(self), timeout)

    def pins(self, digest: str) -> int:
        """Batches and loads pinning `digest` now (draining entries included)."""
        with self._condition:
            entry = self._by_digest.get(digest)
            if entry is None:
                found = [e for e in self._slots if e is not None and e.digest == digest]
                return sum(e.pins for e in found)
            return entry.pins

    def draining(self, digest: str) -> bool:
        """An eviction of `digest` waits for batches that still pin it."""
        with self._condition:
            return any(
                e is not None and e.digest == digest and e.state == "draining" for e in self._slots
            )

    def clear(self) -> None:
        with self._condition:
            self._slots = [None] * self.count
            self._by_digest.clear()
            self._recent.clear()
            self._condition.notify_all()
