"""`AdapterCache`: a small LRU of loaded adapters on the CPU, keyed by digest.

Switching back to a cached adapter needs no download, no parse, no NOLA
materialization: a host serves it in place (its own tensors become the slots'
buffers, `peftreg.hotswap.resident`) or copies it into its spare buffers.
Bounded by a number of entries and by bytes (an entry served in place is
counted once: its tensors are the slots' buffers); the least recently used
entries go first. Thread-safe; one cache may serve several hosts.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from peftreg.hotswap.adapter import LoadedAdapter


class AdapterCache:
    def __init__(self, max_entries: int = 8, max_bytes: int = 2 << 30) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, LoadedAdapter] = OrderedDict()
        self._sizes: dict[str, int] = {}  # digest -> nbytes (counted once per entry)
        self._total = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, digest: str) -> LoadedAdapter | None:
        with self._lock:
            adapter = self._entries.get(digest)
            if adapter is None:
                self.misses += 1
                return None
            self._entries.move_to_end(digest)
            self.hits += 1
            return adapter

    def put(self, adapter: LoadedAdapter) -> None:
        """Keep `adapter` (most recent); evict the oldest beyond the bounds.

        An adapter larger than `max_bytes` alone is not kept.
        """
        digest = adapter.digest
        with self._lock:
            held = self._entries.get(digest) is adapter  # a warm swap: nothing to count again
        size = self._sizes.get(digest, 0) if held else adapter.nbytes
        if size > self.max_bytes:
            return
        with self._lock:
            self._total += size - self._sizes.get(digest, 0)
            self._entries[digest] = adapter
            self._sizes[digest] = size
            self._entries.move_to_end(digest)
            while len(self._entries) > self.max_entries or self._total > self.max_bytes:
                evicted, _adapter = self._entries.popitem(last=False)
                self._total -= self._sizes.pop(evicted)

    def _bytes(self) -> int:
        return self._total

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._bytes()

    def digests(self) -> list[str]:
        """Cached digests, least recently used first."""
        with self._lock:
            return list(self._entries)

    def __contains__(self, digest: object) -> bool:
        with self._lock:
            return digest in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._sizes.clear()
            self._total = 0
