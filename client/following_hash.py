"""A hash that follows a stream of writes on its own thread.

Writing a chunk and hashing it cost about the same (a page-cache copy against
0.6 s of sha256 per GiB); done one after the other on one thread, each waits
for the other. Handed to a `FollowingHash`, the chunks are hashed in order on
a second thread while the writer goes on, and a bounded queue holds the
writer back when the hash falls `depth` pieces behind, so memory stays at a
few pieces whatever the size. The server hashes uploads this way
(`peftreg.registry.storage.filesystem`) and the client its downloads
(`peftreg.transfer.download`). A download that splices its body straight
into the file (`peftreg.splice`) hands over file ranges instead, which the
thread reads back from the page cache (`update_file`).
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from collections.abc import Sequence
from dataclasses import dataclass

_DONE = None
FILE_READ = 1024 * 1024  # a file range is read back in pieces of this size


@dataclass(frozen=True)
class FileRange:
    """Bytes `start` to `end` of the open file `fd`, read back (pread) when hashed."""

    fd: int
    start: int
    end: int


def hash_file_range(
    state: hashlib._Hash,
    fd: int,
    start: int,
    end: int,
    buffer: memoryview,
    stop: threading.Event | None = None,
) -> int:
    """Read bytes `start` to `end` of `fd` into `buffer`, piece by piece, and hash them;
    the offset reached: `end`, or less where the file ends first or `stop` is set."""
    offset = start
    while offset < end and not (stop is not None and stop.is_set()):
        got = os.preadv(fd, [buffer[: min(len(buffer), end - offset)]], offset)
        if got == 0:
            break
        state.update(buffer[:got])
        offset += got
    return offset


Piece = bytes | memoryview | FileRange  # bytes: nothing may change them once handed over


class FollowingHash:
    """`state` updated on a thread with every piece given to `update`, in order."""

    def __init__(self, state: hashlib._Hash, depth: int) -> None:
        self._state = state
        self._pieces: queue.Queue[Sequence[Piece] | None] = queue.Queue(depth)
        self._thread = threading.Thread(target=self._run, name="peftreg-hash", daemon=True)
        self._finished = False
        self._error: OSError | None = None
        self._thread.start()

    def _run(self) -> None:
        buffer: bytearray | None = None
        while (pieces := self._pieces.get()) is not _DONE:
            try:
                for piece in pieces:
                    if self._error is not None:
                        break
                    if isinstance(piece, FileRange):
                        buffer = buffer or bytearray(FILE_READ)
                        self._hash_range(piece, memoryview(buffer))
                    else:
                        self._state.update(piece)
            except OSError as exc:  # a range that cannot be read back: `finish` raises it
                self._error = exc
            finally:
                self._pieces.task_done()

    def _hash_range(self, piece: FileRange, buffer: memoryview) -> None:
        # Shorter than said: the digest check fails, as it must.
        hash_file_range(self._state, piece.fd, piece.start, piece.end, buffer)

    def update(self, *pieces: Piece) -> None:
        """Hash these next (the caller must not change them afterwards)."""
        self._pieces.put(pieces)

    def update_many(self, pieces: Sequence[Piece]) -> None:
        self._pieces.put(pieces)

    def update_file(self, fd: int, start: int, end: int) -> None:
        """Hash bytes `start` to `end` of `fd` next; keep `fd` open until `drain`."""
        self._pieces.put((FileRange(fd, start, end),))

    def drain(self) -> None:
        """Wait until everything given so far is hashed (file ranges read)."""
        if not self._finished:
            self._pieces.join()

    def finish(self) -> hashlib._Hash:
        """The state once every piece given is hashed; the thread ends.

        Raises the `OSError` of a file range that could not be read back.
        """
        if not self._finished:
            self._finished = True
            self._pieces.put(_DONE)
            self._thread.join()
        if self._error is not None:
            raise self._error
        return self._state
