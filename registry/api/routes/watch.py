"""Long-poll on a tag: `GET /api/v1/repositories/{name}/tags/{tag}/watch`.

Returns as soon as the tag's digest differs from the `digest` the caller
knows (an empty or absent `digest` means "no tag"; a tag created, moved or
deleted all count), or after `timeout` seconds (capped at
MAX_WATCH_SECONDS) with `changed: false`. Reading a tag needs `read` on the
repository, as listing its tags does.

The repository is resolved once, in the request's first transaction (which
also reads the tag). A request that has to wait subscribes to the app's one
`TagPoller` for that (repository, tag): a coroutine that re-reads the tag
every POLL_SECONDS in a short transaction on a worker thread while anyone
waits on it, however many callers wait, and ends when the last one leaves.
Waiting holds no thread. A caller that disconnects stops waiting, and a
server that begins to shut down answers every wait at once, unchanged (the
`peftreg.draining` extension), rather than hold its shutdown; one
principal may hold at most MAX_WATCHES_PER_PRINCIPAL waits at once. The
waits in progress are the `tag_watches_in_flight` gauge.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from functools import partial
from typing import Annotated

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.orm import Session

from peftreg.digest import Digest, InvalidDigest
from peftreg.registry.api.deps import PrincipalDep, ServicesDep, authorize, in_read_transaction
from peftreg.registry.api.draining import draining_of
from peftreg.registry.api.openapi import failures
from peftreg.registry.catalog.repositories import find_repository, valid_name
from peftreg.registry.catalog.tags import valid_tag
from peftreg.registry.db.models import Tag
from peftreg.registry.errors import (
    DigestInvalid,
    InvalidRequest,
    NameInvalid,
    NameUnknown,
    TagInvalid,
)
from peftreg.registry.state import Services

router = APIRouter(prefix="/api/v1", tags=["management"])
MAX_WATCH_SECONDS = 60.0
POLL_SECONDS = 0.2
DISCONNECT_CHECK_SECONDS = 1.0
MAX_WATCHES_PER_PRINCIPAL = 100


class TagWatchOut(BaseModel):
    tag: str
    digest: str | None
    changed: bool


def tag_digest(session: Session, *, repository_id: int, tag: str) -> str | None:
    return session.scalar(
        select(Tag.manifest_digest).where(Tag.repository_id == repository_id, Tag.name == tag)
    )


def resolve(session: Session, *, name: str, tag: str) -> tuple[int, str | None]:
    """(the repository's id, the tag's digest or None); the repository must exist."""
    repository = find_repository(session, name=name)
    return repository.id, tag_digest(session, repository_id=repository.id, tag=tag)


class TagPoller:
    """Reads one tag every POLL_SECONDS while it has waiters; `updated` is set after each read."""

    def __init__(self, services: Services, repository_id: int, tag: str, digest: str | None):
        self.read = partial(tag_digest, repository_id=repository_id, tag=tag)
        self.services = services
        self.digest = digest
        self.reads = 0
        self.error: BaseException | None = None
        self.waiters = 0
        self.updated = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        try:
            while self.waiters:
                await asyncio.sleep(POLL_SECONDS)
                self.digest = await in_read_transaction(self.services, self.read)
                self.reads += 1
                self._wake()
        except Exception as exc:  # a database failure: every waiter answers with it
            self.error = exc
            self._wake()

    def _wake(self) -> None:
        updated, self.updated = self.updated, asyncio.Event()
        updated.set()


class TagWatchHub:
    """The app's pollers by (repository id, tag), and the waits per principal."""

    def __init__(self) -> None:
        self.pollers: dict[tuple[int, str], TagPoller] = {}
        self.per_principal: Counter[str] = Counter()

    def join(self, services: Services, key: tuple[int, str], digest: str | None) -> TagPoller:
        poller = self.pollers.get(key)
        if poller is None or poller.task is None or poller.task.done():
            poller = TagPoller(services, key[0], key[1], digest)
            self.pollers[key] = poller
        poller.waiters += 1
        if poller.task is None:
            poller.task = asyncio.create_task(poller.run())
        return poller

    def leave(self, key: tuple[int, str], poller: TagPoller) -> None:
        poller.waiters -= 1
        if poller.waiters == 0 and self.pollers.get(key) is poller:
            del self.pollers[key]


def _hub(request: Request) -> TagWatchHub:
    hub = getattr(request.app.state, "tag_watch_hub", None)
    if hub is None:
        hub = TagWatchHub()
        request.app.state.tag_watch_hub = hub
    assert isinstance(hub, TagWatchHub)
    return hub


def _known(digest: str | None) -> str | None:
    if not digest:
        return None
    try:
        return str(Digest.parse(digest))
    except InvalidDigest as exc:
        raise DigestInvalid(str(exc), detail={"digest": digest}) from None


async def _either(first: asyncio.Event, second: asyncio.Event, timeout: float) -> None:
    """Return once either event is set, or after `timeout` seconds."""
    waits = {asyncio.ensure_future(first.wait()), asyncio.ensure_future(second.wait())}
    try:
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


async def _wait(
    request: Request, poller: TagPoller, known: str | None, deadline: float
) -> str | None:
    """The tag's digest once a read made after this call began differs from `known` (a
    shared poller's earlier read may be older than the caller's), or at the deadline."""
    loop = asyncio.get_running_loop()
    draining = draining_of(request.scope)
    start = poller.reads
    while poller.error is None and (poller.reads == start or poller.digest == known):
        remaining = deadline - loop.time()
        if remaining <= 0 or draining.is_set() or await request.is_disconnected():
            return known
        await _either(poller.updated, draining, min(remaining, DISCONNECT_CHECK_SECONDS))
    if poller.error is not None:
        raise poller.error
    return poller.digest


@router.get(
    "/repositories/{name:path}/tags/{tag}/watch",
    response_model=TagWatchOut,
    responses=failures(NameInvalid, NameUnknown, TagInvalid, DigestInvalid, InvalidRequest),
)
async def watch_tag(
    name: str,
    tag: str,
    request: Request,
    services: ServicesDep,
    principal: PrincipalDep,
    digest: str | None = None,
    timeout: Annotated[float, Query(ge=0)] = 30.0,
) -> TagWatchOut:
    """Wait until the tag's digest differs from `digest`, at most `timeout` seconds."""
    valid_name(name)
    valid_tag(tag)
    authorize(principal, "read", name)
    known = _known(digest)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + min(timeout, MAX_WATCH_SECONDS)
    repository_id, current = await in_read_transaction(
        services, partial(resolve, name=name, tag=tag)
    )
    if current != known or timeout <= 0:
        return TagWatchOut(tag=tag, digest=current, changed=current != known)
    hub = _hub(request)
    if hub.per_principal[principal.name] >= MAX_WATCHES_PER_PRINCIPAL:
        raise InvalidRequest(
            f"{principal.name} already waits on {MAX_WATCHES_PER_PRINCIPAL} tag watches; "
            "end some before starting another",
            detail={"limit": MAX_WATCHES_PER_PRINCIPAL},
        )
    key = (repository_id, tag)
    poller = hub.join(services, key, current)
    hub.per_principal[principal.name] += 1
    services.metrics.add_tag_watches(1)
    try:
        current = await _wait(request, poller, known, deadline)
    finally:
        services.metrics.add_tag_watches(-1)
        hub.per_principal[principal.name] -= 1
        if not hub.per_principal[principal.name]:
            del hub.per_principal[principal.name]
        hub.leave(key, poller)
    return TagWatchOut(tag=tag, digest=current, changed=current != known)
