"""Long-poll on a tag: `GET /api/v1/repositories/{name}/tags/{tag}/watch`.

Returns as soon as the tag's digest differs from the `digest` the caller
knows (an empty or absent `digest` means "no tag"; a tag created, moved or
deleted all count), or after `timeout` seconds (capped at
MAX_WATCH_SECONDS) with `changed: false`. The wait is a coroutine: the tag
is re-read every POLL_SECONDS in a short transaction on a worker thread, so
no thread is held for the whole wait. A caller that disconnects ends it.
Reading a tag needs `read` on the repository, as listing its tags does.
"""

from __future__ import annotations

import asyncio
from functools import partial
from typing import Annotated

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.orm import Session

from client.digest import Digest, InvalidDigest
from registry.api.deps import PrincipalDep, ServicesDep, authorize, in_transaction
from registry.catalog.repositories import find_repository, valid_name
from registry.catalog.tags import valid_tag
from registry.db.models import Tag
from registry.errors import DigestInvalid

router = APIRouter(prefix="/api/v1", tags=["management"])
MAX_WATCH_SECONDS = 60.0
POLL_SECONDS = 0.2


class TagWatchOut(BaseModel):
    tag: str
    digest: str | None
    changed: bool


def current_digest(session: Session, *, name: str, tag: str) -> str | None:
    """The digest `tag` points at in `name` (None: no such tag); the repository must exist."""
    repository = find_repository(session, name=name)
    return session.scalar(
        select(Tag.manifest_digest).where(Tag.repository_id == repository.id, Tag.name == tag)
    )


def _known(digest: str | None) -> str | None:
    if not digest:
        return None
    try:
        return str(Digest.parse(digest))
    except InvalidDigest as exc:
        raise DigestInvalid(str(exc), detail={"digest": digest}) from None


@router.get("/repositories/{name:path}/tags/{tag}/watch", response_model=TagWatchOut)
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
    read = partial(current_digest, name=name, tag=tag)
    while True:
        current = await in_transaction(services, read)
        if current != known:
            return TagWatchOut(tag=tag, digest=current, changed=True)
        remaining = deadline - loop.time()
        if remaining <= 0 or await request.is_disconnected():
            return TagWatchOut(tag=tag, digest=current, changed=False)
        await asyncio.sleep(min(POLL_SECONDS, remaining))
