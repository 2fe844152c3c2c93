"""What a host reports after each swap: a completed swap or a failed one."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SwapEvent:
    """A completed swap (or unload: `digest` None)."""

    previous: str | None  # the digest active before
    digest: str | None  # the digest active now
    reference: str | None  # what was asked for, e.g. "acme/bot@sha256:..." or a directory
    kind: str | None
    seconds: float  # from the call to the flip, loading included
    bytes_copied: int  # bytes written into the host's buffers or weights
    cached: bool  # the adapter came from the in-memory cache (no download, no parse)
    task_id: int | None = None  # the task a multitask prompt serves now


@dataclass(frozen=True)
class SwapFailure:
    """A swap that failed; `active` is the digest that stayed active."""

    reference: str | None
    active: str | None
    error: BaseException


SwapListener = Callable[[SwapEvent], None]
FailureListener = Callable[[SwapFailure], None]


class Listeners:
    """Callbacks for completed and failed swaps; a callback that raises is logged, not fatal."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._swapped: list[SwapListener] = []
        self._failed: list[FailureListener] = []

    def subscribe(
        self, on_swap: SwapListener | None = None, on_error: FailureListener | None = None
    ) -> Callable[[], None]:
        """Register callbacks; returns a function that removes them."""
        with self._lock:
            if on_swap is not None:
                self._swapped.append(on_swap)
            if on_error is not None:
                self._failed.append(on_error)

        def unsubscribe() -> None:
            with self._lock:
                if on_swap is not None and on_swap in self._swapped:
                    self._swapped.remove(on_swap)
                if on_error is not None and on_error in self._failed:
                    self._failed.remove(on_error)

        return unsubscribe

    def swapped(self, event: SwapEvent) -> None:
        with self._lock:
            callbacks = list(self._swapped)
        for callback in callbacks:
            notify(callback, event)

    def failed(self, failure: SwapFailure) -> None:
        with self._lock:
            callbacks = list(self._failed)
        for callback in callbacks:
            notify(callback, failure)


def notify(callback: Callable[[object], None] | Callable[..., None], event: object) -> None:
    """Call one listener; its exception is logged and swallowed."""
    try:
        callback(event)
    except Exception:
        logger.exception("hot-swap listener %r raised", callback)
