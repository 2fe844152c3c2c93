"""The version page (adapter card), file downloads, and comparing two versions."""

from __future__ import annotations

from functools import partial
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import StreamingResponse
from markdown_it import MarkdownIt
from starlette.concurrency import iterate_in_threadpool

from peftreg.merge.compat import mergeable_kind
from peftreg.reference import InvalidReference, Reference
from peftreg.registry.api.deps import authorize, authorize_any, in_read_transaction
from peftreg.registry.catalog import blobs
from peftreg.registry.catalog.comparison import compare_stored
from peftreg.registry.catalog.repositories import valid_name
from peftreg.registry.errors import InvalidRequest
from peftreg.registry.web.browse import services_of
from peftreg.registry.web.card import version_card
from peftreg.registry.web.rendering import WebRoute, page
from peftreg.registry.web.session import Viewer, get_viewer

router = APIRouter(prefix="/ui", route_class=WebRoute, include_in_schema=False)
ViewerDep = Annotated[Viewer, Depends(get_viewer)]


def render_markdown(text: str) -> str:
    """CommonMark with raw HTML disabled: a pushed README cannot inject markup or script."""
    return str(MarkdownIt("commonmark", {"html": False}).render(text))


@router.get("/r/{name:path}/-/versions/{reference}")
async def version(name: str, reference: str, request: Request, viewer: ViewerDep) -> Response:
    valid_name(name)
    authorize(viewer.principal, "read", name)
    services = services_of(request)
    card = await in_read_transaction(
        services,
        partial(
            version_card,
            store=services.store,
            principal=viewer.principal,
            repository=name,
            reference=reference,
        ),
    )
    readme_html = render_markdown(card.readme) if card.readme and card.readme_markdown else None
    can_export = mergeable_kind(card.kind) and viewer.principal.can("write", name)
    context = {
        "card": card,
        "readme_html": readme_html,
        "can_export": can_export,
        "registry_url": str(request.base_url).rstrip("/"),
    }
    return page(request, viewer, "version.html", context)


@router.get("/r/{name:path}/-/blobs/{digest}")
async def download(
    name: str, digest: str, request: Request, viewer: ViewerDep, filename: str = "blob"
) -> Response:
    """A file of a version, with the browser's session (the /v2 API wants a token header)."""
    valid_name(name)
    authorize(viewer.principal, "read", name)
    services = services_of(request)
    parsed = blobs.parse_digest(digest)
    size = await in_read_transaction(
        services, partial(blobs.linked_size, repository=name, digest=parsed)
    )
    safe_name = "".join(c if c.isalnum() or c in "._-" else "_" for c in filename)[:200] or "blob"
    chunks = iterate_in_threadpool(iter(services.store.read(parsed)))
    return StreamingResponse(
        chunks,
        media_type="application/octet-stream",
        headers={
            "Content-Length": str(size),
            "Content-Disposition": f'attachment; filename="{safe_name}"',
            "Docker-Content-Digest": str(parsed),
            "X-Content-Type-Options": "nosniff",
        },
    )


def _split(text: str) -> tuple[str, str]:
    try:
        reference = Reference.parse(text.strip())
    except InvalidReference as exc:
        raise InvalidRequest(f"{text!r}: {exc}") from None
    return reference.repository, reference.identifier


@router.get("/compare")
async def compare(request: Request, viewer: ViewerDep, a: str = "", b: str = "") -> Response:
    authorize_any(viewer.principal)
    result = None
    if a and b:
        first, second = _split(a), _split(b)
        authorize(viewer.principal, "read", first[0])
        authorize(viewer.principal, "read", second[0])
        services = services_of(request)
        result = await in_read_transaction(
            services, partial(compare_stored, store=services.store, first=first, second=second)
        )
    return page(request, viewer, "compare.html", {"a": a, "b": b, "result": result})
