"""API tokens (administrators): list, create (the secret shown once), revoke."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from sqlalchemy.orm import Session

from peftreg.registry.api.deps import authorize_global_admin, in_read_transaction, in_transaction
from peftreg.registry.auth import tokens
from peftreg.registry.catalog import audit
from peftreg.registry.errors import InvalidRequest
from peftreg.registry.web.browse import services_of
from peftreg.registry.web.rendering import WebRoute, page, redirect
from peftreg.registry.web.session import Viewer, get_viewer, read_form

router = APIRouter(prefix="/ui", route_class=WebRoute, include_in_schema=False)
ViewerDep = Annotated[Viewer, Depends(get_viewer)]


@router.get("/tokens")
async def token_list(request: Request, viewer: ViewerDep) -> Response:
    authorize_global_admin(viewer.principal)
    rows = await in_read_transaction(services_of(request), tokens.list_tokens)
    return page(request, viewer, "tokens.html", {"tokens": rows, "issued": None})


@router.post("/tokens")
async def create(request: Request, viewer: ViewerDep) -> Response:
    authorize_global_admin(viewer.principal)
    form = await read_form(request, viewer)
    name = form.get("name", "").strip()
    if not name or len(name) > 255:
        raise InvalidRequest("a token needs a name of 1 to 255 characters")
    grant = {"pattern": form.get("pattern", "").strip(), "scope": form.get("scope", "")}

    def work(session: Session) -> tuple[tokens.IssuedToken, list[object]]:
        issued = tokens.create_token(
            session, name=name, grants=[grant], created_by=viewer.principal.name
        )
        audit.record(session, actor=viewer.principal.name, action="token.create", target=issued.id)
        return issued, list(tokens.list_tokens(session))

    issued, rows = await in_transaction(services_of(request), work)
    # The secret is in this response only: never stored, never in a URL (no redirect).
    return page(request, viewer, "tokens.html", {"tokens": rows, "issued": issued}, 201)


@router.post("/tokens/{token_id}/revoke")
async def revoke(token_id: str, request: Request, viewer: ViewerDep) -> Response:
    authorize_global_admin(viewer.principal)
    await read_form(request, viewer)

    def work(session: Session) -> None:
        tokens.revoke_token(session, token_id=token_id)
        audit.record(session, actor=viewer.principal.name, action="token.revoke", target=token_id)

    await in_transaction(services_of(request), work)
    return redirect(request, viewer, "/ui/tokens")
