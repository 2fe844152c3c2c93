"""`TagFollower`: keep a host on whatever a channel tag (e.g. `acme/bot:prod`) points at.

A daemon thread long-polls the registry's tag watch endpoint
(`Client.watch_tag`): the request returns as soon as the tag's digest differs
from the one the follower knows, or after `poll_timeout` seconds unchanged.
When the tag moves the follower swaps the host to the new digest (a cache
hit costs no download).

Failures are reported to `on_error` and handled by what they mean:

- a bad adapter (`SwapError`), or a registry answer that will not change
  for this digest (401, 403, 404: not allowed, or gone): the digest counts
  as seen, and the follower waits for the tag to move again;
- anything else while pulling (unreachable, 5xx, a broken download) and any
  failure of the watch itself (including a malformed answer): retried after
  a pause that doubles each time, from `min_backoff` up to `max_backoff`,
  and goes back to `min_backoff` only after a successful swap or when the
  tag points at a new digest;
- a deleted tag: reported once; the active adapter stays.

Each long poll runs on a helper thread, so `stop()` returns at once (the
abandoned request ends on its own; its answer is ignored) and the follower
swaps nothing after it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Protocol

from peftreg.digest import Digest
from peftreg.hotswap.errors import HostError, SwapError, TagMissing
from peftreg.hotswap.events import FailureListener, SwapEvent, SwapFailure, SwapListener, notify
from peftreg.reference import InvalidReference, Reference
from peftreg.sdk.client import Client
from peftreg.sdk.errors import PeftregError

logger = logging.getLogger(__name__)
FINAL_STATUSES = frozenset({401, 403, 404})  # retrying the same digest will not help

__all__ = ["TagFollower", "TagMissing"]


class SwapTarget(Protocol):
    """What a follower keeps on the tag: an `AdapterHost`, or one name of a
    `MultiAdapterHost`."""

    @property
    def active_digest(self) -> str | None: ...
    @property
    def detached(self) -> bool: ...
    def swap(self, source: Reference, *, client: Client | None = None) -> SwapEvent: ...


class _Stopped(Exception):
    """stop() was called while the follower waited."""


class TagFollower:
    """Follows one tag for one host; see the module docstring."""

    def __init__(
        self,
        host: SwapTarget,
        client: Client,
        reference: str,
        *,
        on_swap: SwapListener | None = None,
        on_error: FailureListener | None = None,
        poll_timeout: float = 30.0,
        min_backoff: float = 0.5,
        max_backoff: float = 30.0,
    ) -> None:
        try:
            parsed = Reference.parse(reference, default_tag=None)
        except InvalidReference as exc:
            raise HostError(str(exc)) from None
        if parsed.tag is None:
            raise HostError(f"follow a tag (e.g. acme/bot:prod), not the digest {reference}")
        self.host = host
        self.client = client
        self.reference = parsed
        self.on_swap = on_swap
        self.on_error = on_error
        self.poll_timeout = poll_timeout
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self.known: str | None = None  # the tag's digest as last handled
        self.swaps = 0
        self.errors = 0
        self._stop = threading.Event()
        self._wake = threading.Event()  # a long poll answered, or stop() was called
        self._thread = threading.Thread(
            target=self._run, name=f"peftreg-follow {parsed}", daemon=True
        )

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """End the follower and wait for its thread (up to `timeout` seconds; 0: do not
        wait). A long poll in flight is abandoned; a swap in progress finishes first."""
        self._stop.set()
        self._wake.set()
        alive = self._thread.is_alive()
        if alive and timeout != 0 and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def __enter__(self) -> TagFollower:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def _report(self, error: BaseException) -> None:
        self.errors += 1
        logger.warning("following %s: %s", self.reference, error)
        if self.on_error is not None:
            notify(self.on_error, SwapFailure(str(self.reference), self.host.active_digest, error))

    def _stopping(self) -> bool:
        return self._stop.is_set() or self.host.detached

    def _watch(self) -> str | None:
        """One long poll on a helper thread; raises `_Stopped` when stop() comes first."""
        repository, tag = self.reference.repository, self.reference.tag
        assert tag is not None
        answer: list[str | None] = []
        failure: list[BaseException] = []
        known = self.known

        def poll() -> None:
            try:
                answer.append(self.client.watch_tag(repository, tag, known, self.poll_timeout))
            except BaseException as exc:
                failure.append(exc)
            finally:
                self._wake.set()

        self._wake.clear()
        if self._stopping():
            raise _Stopped
        threading.Thread(target=poll, name=f"peftreg-watch {self.reference}", daemon=True).start()
        self._wake.wait()
        if self._stopping():
            raise _Stopped
        if failure:
            raise failure[0]
        return answer[0]

    def _pause(self, seconds: float) -> None:
        if self._stop.wait(seconds):
            raise _Stopped

    def _run(self) -> None:
        with contextlib.suppress(_Stopped):
            self._follow()

    def _follow(self) -> None:
        delay = self.min_backoff
        failing: str | None = None  # the digest whose last pull failed (and is retried)
        while not self._stopping():
            try:
                current = self._watch()
            except _Stopped:
                raise
            except Exception as exc:  # unreachable, refused, or a malformed answer
                self._report(exc)
                self._pause(delay)
                delay = min(self.max_backoff, delay * 2)
                continue
            if current == self.known:
                continue  # the poll timed out unchanged
            if current != failing:
                delay, failing = self.min_backoff, None  # a new digest
            if current is None:
                self.known = None
                self._report(TagMissing(f"{self.reference} does not exist; the adapter stays"))
            elif self._swap_to(current):
                failing, delay = None, self.min_backoff
            elif self.known != current:  # to be retried
                failing = current
                self._pause(delay)
                delay = min(self.max_backoff, delay * 2)

    def _swap_to(self, current: str) -> bool:
        """Swap the host to `current`; False on failure (`known` set when it is final)."""
        try:
            pinned = Reference(self.reference.repository, digest=Digest.parse(current))
            event = self.host.swap(pinned, client=self.client)
        except SwapError as exc:
            self.known = current  # a bad adapter: wait until the tag moves again
            self._report(exc)
            return False
        except HostError as exc:
            if self.host.detached:
                raise _Stopped from None
            self.known = current  # the host cannot take it (e.g. no client): final
            self._report(exc)
            return False
        except PeftregError as exc:
            if exc.status in FINAL_STATUSES:
                self.known = current  # not allowed or gone: wait for the next move
            self._report(exc)
            return False
        except Exception as exc:
            self.known = current
            self._report(exc)
            return False
        self.known = current
        self.swaps += 1
        if self.on_swap is not None:
            notify(self.on_swap, event)
        return True
