"""Threads a server process runs beside the API (the embedded worker, periodic GC).

Each target runs as `target(stop)` and must return soon after `stop` is set.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

logger = logging.getLogger(__name__)

Target = Callable[[threading.Event], None]


class BackgroundThreads:
    def __init__(self, join_timeout: float = 60.0) -> None:
        self.stop = threading.Event()
        self.join_timeout = join_timeout
        self._targets: list[tuple[str, Target]] = []
        self._threads: list[threading.Thread] = []

    def add(self, name: str, target: Target) -> None:
        self._targets.append((name, target))

    def start(self) -> None:
        self.stop.clear()
        for name, target in self._targets:
            thread = threading.Thread(target=self._run, args=(name, target), name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def _run(self, name: str, target: Target) -> None:
        try:
            target(self.stop)
        except Exception:
            logger.exception("background thread %s crashed", name)

    def shutdown(self) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(self.join_timeout)
        self._threads.clear()
