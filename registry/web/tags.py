"""Tags with their immutability, a channel tag's history, and the audit log (administrators)."""

from __future__ import annotations

from functools import partial
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from sqlalchemy.orm import Session

from peftreg.registry.api.deps import authorize, authorize_global_admin, in_read_transaction
from peftreg.registry.catalog import audit, tags
from peftreg.registry.catalog.repositories import find_repository, is_immutable_tag, valid_name
from peftreg.registry.web.browse import services_of
from peftreg.registry.web.rendering import WebRoute, page
from peftreg.registry.web.session import Viewer, get_viewer

router = APIRouter(prefix="/ui", route_class=WebRoute, include_in_schema=False)
ViewerDep = Annotated[Viewer, Depends(get_viewer)]
AUDIT_LIMIT = 200
TAGS_PER_PAGE = 100


def _tags(session: Session, *, name: str, after: str | None) -> dict[str, Any]:
    repo = find_repository(session, name=name)
    found = tags.tag_rows(session, repository=repo, limit=TAGS_PER_PAGE + 1, after=after)
    rows = [
        {
            "name": row.name,
            "digest": row.manifest_digest,
            "immutable": is_immutable_tag(repo, row.name),
            "updated_at": row.updated_at,
        }
        for row in found[:TAGS_PER_PAGE]
    ]
    more = len(found) > TAGS_PER_PAGE
    return {"repo": repo, "tags": rows, "next_after": rows[-1]["name"] if more else None}


@router.get("/r/{name:path}/-/tags")
async def tag_list(
    name: str, request: Request, viewer: ViewerDep, after: str | None = None
) -> Response:
    valid_name(name)
    authorize(viewer.principal, "read", name)
    work = partial(_tags, name=name, after=after or None)
    context = await in_read_transaction(services_of(request), work)
    return page(request, viewer, "tags.html", {"repository": name, **context})


def _history(session: Session, *, name: str, tag: str) -> dict[str, Any]:
    repo = find_repository(session, name=name)
    events = tags.tag_history(session, repository=repo, tag=tags.valid_tag(tag))
    return {"events": list(reversed(events)), "immutable": is_immutable_tag(repo, tag)}


@router.get("/r/{name:path}/-/tags/{tag}")
async def tag_history(name: str, tag: str, request: Request, viewer: ViewerDep) -> Response:
    valid_name(name)
    authorize(viewer.principal, "read", name)
    context = await in_read_transaction(services_of(request), partial(_history, name=name, tag=tag))
    return page(request, viewer, "tag_history.html", {"repository": name, "tag": tag, **context})


@router.get("/audit")
async def audit_log(request: Request, viewer: ViewerDep, repository: str | None = None) -> Response:
    authorize_global_admin(viewer.principal)
    events = await in_read_transaction(
        services_of(request),
        partial(audit.recent, repository=repository or None, limit=AUDIT_LIMIT),
    )
    return page(request, viewer, "audit.html", {"events": events, "repository": repository or ""})
