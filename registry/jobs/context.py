"""What a job handler sees: its inputs, scratch space, and ways to report and stop."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy.orm import Session

from peftreg.digest import Digest
from peftreg.registry.state import Services


class JobInterrupted(Exception):
    """The handler must stop now; the worker decides what happens to the job."""

    reason = "interrupted"


class JobCancelled(JobInterrupted):
    reason = "cancelled"


class LeaseLost(JobInterrupted):
    reason = "lease lost"


class ShuttingDown(JobInterrupted):
    reason = "worker shutting down"


class JobInputError(Exception):
    """A job that can never succeed as requested; it fails without a retry."""


class Completion(Protocol):
    """A handler's outcome whose side effect must commit with the job's completion."""

    @property
    def result(self) -> dict[str, Any]: ...

    def finalize(self, session: Session) -> None: ...


@dataclass
class JobContext:
    job_id: str
    kind: str
    attempt: int
    params: dict[str, Any]
    inputs: dict[str, Any]
    worker_id: str
    device: str
    services: Services
    work_dir: Path
    log: Callable[[str], None]
    _progress: tuple[float, str] | None = None
    _protected: list[Digest] = field(default_factory=list)
    _interrupt: type[JobInterrupted] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def progress(self, fraction: float, message: str) -> None:
        """Record progress; the heartbeat writes the latest value to the database."""
        with self._lock:
            self._progress = (fraction, message)

    def take_progress(self) -> tuple[float, str] | None:
        with self._lock:
            value, self._progress = self._progress, None
            return value

    def protect(self, digest: Digest) -> None:
        """Keep a blob this job uploaded from garbage collection until the job ends.

        Output blobs are unreferenced until the manifest is put at completion;
        each heartbeat refreshes them, so a job longer than the GC grace period
        never loses its early shards.
        """
        with self._lock:
            self._protected.append(digest)

    def protected(self) -> list[Digest]:
        with self._lock:
            return list(self._protected)

    def interrupt(self, reason: type[JobInterrupted]) -> None:
        with self._lock:
            if self._interrupt is None:
                self._interrupt = reason

    def cancelled(self) -> bool:
        """Whether the handler should stop (polled between units of work)."""
        return self._interrupt is not None

    def check(self) -> None:
        """Raise the pending interruption, if any."""
        if self._interrupt is not None:
            raise self._interrupt()
