"""Running digests of upload sessions, so a commit need not re-read the bytes.

An optimisation only: when a session was written by another process (another
API replica) or out of order, the backend re-hashes the stored bytes instead.
A backend whose stored bytes can change under one size (S3 segments, named per
writer) binds each hash to a `layout` token naming exactly the stored pieces
it covers; a commit uses the hash only for that same layout.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Hashable
from dataclasses import dataclass


@dataclass(frozen=True)
class _Running:
    size: int
    state: hashlib._Hash
    layout: Hashable = None


class RunningHashes:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._states: dict[str, _Running] = {}

    def begin(self, upload_id: str, offset: int, layout: Hashable = None) -> hashlib._Hash | None:
        """The hasher for bytes appended at `offset` to `layout`, or None if unknown."""
        with self._lock:
            if offset == 0:
                state = hashlib.sha256()
                self._states[upload_id] = _Running(0, state, layout)
                return state.copy()
            entry = self._states.get(upload_id)
            if entry is None or entry.size != offset or entry.layout != layout:
                self._states.pop(upload_id, None)
                return None
            return entry.state.copy()

    def advance(
        self,
        upload_id: str,
        start: int,
        new_size: int,
        state: hashlib._Hash,
        layout: Hashable = None,
    ) -> None:
        """Record the hash after a write from `start`, unless the session moved meanwhile.

        A compare-and-swap: if another writer advanced the session since this
        one began, the known hash is dropped and a commit re-hashes the bytes.
        """
        with self._lock:
            entry = self._states.get(upload_id)
            if entry is None or entry.size != start:
                self._states.pop(upload_id, None)
                return
            self._states[upload_id] = _Running(new_size, state, layout)

    def take(self, upload_id: str, size: int, layout: Hashable = None) -> str | None:
        """The sha256 hex of the first `size` bytes if known (for `layout`); forgets it."""
        with self._lock:
            entry = self._states.pop(upload_id, None)
        if entry is None or entry.size != size or entry.layout != layout:
            return None
        return entry.state.hexdigest()

    def forget(self, upload_id: str) -> None:
        with self._lock:
            self._states.pop(upload_id, None)
