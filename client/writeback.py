"""Start the kernel's writeback of a file's written range early, without waiting.

A blob is fsynced once, when it is complete: on the server when its upload
is committed, in the client's cache before a download is renamed to its
digest. Left alone, the kernel starts writing a large file's pages to disk
only when dirty memory passes its background threshold (10% of memory by
default), so the whole blob is written at the final fsync and the client
waits for all of it. Asking for writeback of each range as soon as it is
written (Linux `sync_file_range` with `SYNC_FILE_RANGE_WRITE`: start, do not
wait) lets the disk work while the rest of the bytes arrive; the final fsync
then waits only for the tail. Durability is unchanged: it still comes from
that fsync. Elsewhere (or if the call fails) this does nothing.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable
from functools import cache

SYNC_FILE_RANGE_WRITE = 2
WRITEBACK_EVERY = 16 * 1024 * 1024  # bytes written between two writeback requests


@cache
def _load() -> Callable[[int, int, int], None] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        # The symbols already loaded into this process, libc's among them. Not
        # `ctypes.util.find_library("c")`: it runs `ldconfig -p`, ~20 ms of every transfer.
        libc = ctypes.CDLL(None, use_errno=True)
        call = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    call.restype = ctypes.c_int

    def start(fd: int, offset: int, length: int) -> None:
        call(fd, offset, length, SYNC_FILE_RANGE_WRITE)  # a failure only loses the head start

    return start


class EarlyWriteback:
    """Asks for writeback of every `every` bytes appended to one file descriptor."""

    def __init__(self, fd: int, offset: int, every: int = WRITEBACK_EVERY) -> None:
        self._fd = fd
        self._requested = offset
        self._every = every

    def written(self, end: int) -> None:
        """The file now holds bytes up to `end`; start writing back what is due."""
        if end - self._requested < self._every or (start := _load()) is None:
            return
        start(self._fd, self._requested, end - self._requested)
        self._requested = end
