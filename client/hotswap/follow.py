"""`TagFollower`: keep a host on whatever a channel tag (e.g. `acme/bot:prod`) points at.

A daemon thread long-polls the registry's tag watch endpoint
(`Client.watch_tag`): the request returns as soon as the tag's digest differs
from the one the follower knows, or after `poll_timeout` seconds unchanged.
When the tag moves the follower swaps the host to the new digest (a cache
hit costs no download). A failed swap (a bad adapter) is reported and the
follower waits for the tag to move again; registry errors (unreachable,
5xx, refused) are reported and retried with exponential backoff. A deleted
tag is reported and the active adapter stays.

`stop()` returns once the thread has finished its current long-poll
(at most `poll_timeout` seconds).
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from client.digest import Digest
from client.hotswap.errors import HostError, SwapError
from client.hotswap.events import FailureListener, SwapFailure, SwapListener, notify
from client.reference import InvalidReference, Reference
from client.sdk.client import Client
from client.sdk.errors import PeftregError

if TYPE_CHECKING:
    from client.hotswap.host import AdapterHost

logger = logging.getLogger(__name__)


class TagMissing(SwapError):
    """The followed tag does not exist (any more); the active adapter stays."""


class TagFollower:
    """Follows one tag for one host; see the module docstring."""

    def __init__(
        self,
        host: AdapterHost,
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
        self.known: str | None = None  # the tag's digest as last seen
        self.swaps = 0
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"peftreg-follow {parsed}", daemon=True
        )

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Ask the thread to end and wait for it (up to `timeout` seconds; 0: do not wait)."""
        self._stop.set()
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

    def _run(self) -> None:
        delay = self.min_backoff
        repository, tag = self.reference.repository, self.reference.tag
        assert tag is not None
        while not self._stop.is_set() and not self.host.detached:
            try:
                current = self.client.watch_tag(
                    repository, tag, self.known, timeout=self.poll_timeout
                )
            except PeftregError as exc:
                self._report(exc)
                self._stop.wait(delay)
                delay = min(self.max_backoff, delay * 2)
                continue
            delay = self.min_backoff
            if current == self.known or self._stop.is_set() or self.host.detached:
                continue
            if current is None:
                self.known = None
                self._report(TagMissing(f"{self.reference} does not exist; the adapter stays"))
                continue
            try:
                pinned = Reference(repository, digest=Digest.parse(current))
                event = self.host.swap(pinned, client=self.client)
            except SwapError as exc:
                self.known = current  # a bad adapter: wait until the tag moves again
                self._report(exc)
                continue
            except PeftregError as exc:  # the registry failed while pulling: retry
                self._report(exc)
                self._stop.wait(delay)
                delay = min(self.max_backoff, delay * 2)
                continue
            except Exception as exc:
                self.known = current
                self._report(exc)
                continue
            self.known = current
            self.swaps += 1
            if self.on_swap is not None:
                notify(self.on_swap, event)
