"""Running digests of upload sessions, so a commit need not re-read the bytes.

An optimisation only: when a session was written by another process (another
API replica) or out of order, the backend re-hashes the stored bytes instead.
"""

from __future__ import annotations

import hashlib
import threading


class RunningHashes:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._states: dict[str, tuple[int, hashlib._Hash]] = {}

    def begin(self, upload_id: str, offset: int) -> hashlib._Hash | None:
        """The hasher for bytes appended at `offset`, or None if unknown."""
        with self._lock:
            if offset == 0:
                state = hashlib.sha256()
                self._states[upload_id] = (0, state)
                return state.copy()
            entry = self._states.get(upload_id)
            if entry is None or entry[0] != offset:
                self._states.pop(upload_id, None)
                return None
            return entry[1].copy()

    def advance(self, upload_id: str, start: int, new_size: int, state: hashlib._Hash) -> None:
        """Record the hash after a write from `start`, unless the session moved meanwhile.

        A compare-and-swap: if another writer advanced the session since this
        one began, the known hash is dropped and a commit re-hashes the bytes.
        """
        with self._lock:
            entry = self._states.get(upload_id)
            if entry is None or entry[0] != start:
                self._states.pop(upload_id, None)
                return
            self._states[upload_id] = (new_size, state)

    def take(self, upload_id: str, size: int) -> str | None:
        """The sha256 hex of the first `size` bytes if known; forgets the session."""
        with self._lock:
            entry = self._states.pop(upload_id, None)
        if entry is None or entry[0] != size:
            return None
        return entry[1].hexdigest()

    def forget(self, upload_id: str) -> None:
        with self._lock:
            self._states.pop(upload_id, None)
