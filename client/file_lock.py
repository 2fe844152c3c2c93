"""An exclusive lock between processes (and threads), held on a lock file.

Outside Windows it is `flock` on a descriptor of its own, so two holders
exclude each other whether they are processes or threads, and it works
with the `filelock` package (which locks the same way there) without
importing it: that import was a tenth of a small pull's start-up. On
Windows the `filelock` package does the work. Not re-entrant: a holder
must not take the same lock again.
"""

from __future__ import annotations

import os
import sys
from types import TracebackType

if sys.platform != "win32":
    import fcntl

    class FileLock:
        def __init__(self, path: str) -> None:
            self.path = path
            self._fd: int | None = None

        def __enter__(self) -> FileLock:
            while True:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                    if os.fstat(fd).st_nlink > 0:
                        self._fd = fd
                        return self
                except BaseException:
                    os.close(fd)
                    raise
                os.close(fd)  # removed while we waited (a cache clear): lock the new file

        def __exit__(
            self,
            exc_type: type[BaseException] | None,
            exc: BaseException | None,
            traceback: TracebackType | None,
        ) -> None:
            fd, self._fd = self._fd, None
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)

else:  # pragma: no cover - exercised on Windows only
    from filelock import FileLock
