"""Read a file ahead on a thread, hashing every byte once, for streamed uploads.

A reader thread reads blocks into a small bounded queue and hashes them
while the caller's thread sends the previous ones, so reading, hashing and
sending overlap and memory stays at a few blocks whatever the file size.
An upload that resumes from an earlier offset reads those bytes again but
does not hash them again: the hash covers each byte of the file once, in
order, up to the furthest point read (`hashed`).
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from collections.abc import Generator
from pathlib import Path

from peftreg.digest import Digest
from peftreg.following_hash import hash_file_range

BLOCK = 1024 * 1024
DEPTH = 4  # blocks read ahead: peak memory is about (DEPTH + 2) * BLOCK


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


class HashingReader:
    """Blocks of one file from any offset, hashed once in file order."""

    def __init__(self, path: Path, size: int, algorithm: str = "sha256") -> None:
        self.path = path
        self.size = size
        self.algorithm = algorithm
        self._hasher = hashlib.new(algorithm)
        self.hashed = 0

    def digest(self) -> Digest:
        """The digest of the whole file; every byte must have been read."""
        if self.hashed != self.size:
            raise RuntimeError(f"{self.path}: hashed {self.hashed} of {self.size} bytes")
        return Digest(self.algorithm, self._hasher.hexdigest())

    def hash_rest(self, stop: threading.Event | None = None) -> None:
        """Read and hash the file from where the hash stands to `size` (for a body the
        kernel sends: nothing here is handed on), into one reused block; until `stop`."""
        fd = os.open(self.path, os.O_RDONLY)
        try:
            with memoryview(bytearray(BLOCK)) as view:
                self.hashed = hash_file_range(self._hasher, fd, self.hashed, self.size, view, stop)
        finally:
            os.close(fd)
        if self.hashed < self.size and not (stop is not None and stop.is_set()):
            raise OSError(f"{self.path} shrank while it was being pushed")

    def blocks(self, offset: int = 0) -> Generator[bytes, None, None]:
        """The file's bytes from `offset` to `size`, read ahead on a thread.

        Stops with an error if the file is shorter than the size it had
        when the push started (it changed under us).
        """
        if offset > self.hashed:
            raise ValueError(f"cannot resume at {offset}: only {self.hashed} bytes were hashed")
        blocks: queue.Queue[bytes | _Failed | None] = queue.Queue(DEPTH)
        stop = threading.Event()

        def put(item: bytes | _Failed | None) -> bool:
            while not stop.is_set():
                try:
                    blocks.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def read() -> None:
            try:
                fd = os.open(self.path, os.O_RDONLY)
                try:
                    position = offset
                    while position < self.size and not stop.is_set():
                        block = os.pread(fd, min(BLOCK, self.size - position), position)
                        if not block:
                            raise OSError(f"{self.path} shrank while it was being pushed")
                        end = position + len(block)
                        if end > self.hashed:
                            self._hasher.update(memoryview(block)[self.hashed - position :])
                            self.hashed = end
                        position = end
                        if not put(block):
                            return
                finally:
                    os.close(fd)
                put(None)
            except BaseException as exc:  # handed to the consuming thread
                put(_Failed(exc))

        thread = threading.Thread(target=read, name="peftreg-readahead", daemon=True)
        thread.start()
        try:
            while True:
                item = blocks.get()
                if item is None:
                    return
                if isinstance(item, _Failed):
                    raise item.error
                yield item
        finally:
            stop.set()
            thread.join()
