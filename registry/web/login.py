"""Login with an API token (kept in the signed session cookie), and logout."""

from __future__ import annotations

from functools import partial
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from starlette.concurrency import run_in_threadpool

from peftreg.registry.api.deps import identify, registry_service
from peftreg.registry.errors import Unauthorized
from peftreg.registry.web.browse import services_of
from peftreg.registry.web.rendering import WebRoute, page, redirect
from peftreg.registry.web.session import Viewer, codec_of, get_viewer, read_form

router = APIRouter(prefix="/ui", route_class=WebRoute, include_in_schema=False)
ViewerDep = Annotated[Viewer, Depends(get_viewer)]


def safe_next(target: str | None) -> str:
    """Only a path inside the UI: never an open redirect to another site."""
    if target and target.startswith("/ui/") and "//" not in target and "\\" not in target:
        return target
    return "/ui/"


@router.get("/login")
async def login_form(request: Request, viewer: ViewerDep, next: str | None = None) -> Response:
    context = {"next": safe_next(next), "error": None}
    return page(request, viewer, "login.html", context)


@router.post("/login")
async def login(request: Request, viewer: ViewerDep) -> Response:
    form = await read_form(request, viewer)
    presented = form.get("token", "").strip()
    target = safe_next(form.get("next"))
    try:
        if not presented:
            raise Unauthorized("enter a token")
        services = services_of(request)
        check = partial(identify, service=registry_service(request, services))
        await run_in_threadpool(check, services, f"Bearer {presented}")
    except Unauthorized as exc:
        context = {"next": target, "error": exc.message}
        return page(request, viewer, "login.html", context, 401)
    codec = codec_of(request)
    session = codec.new(presented)  # a new session id: no fixation across the login
    viewer.session, viewer.csrf, viewer.set_cookie = (
        session,
        codec.csrf_token(session),
        codec.encode(session),
    )
    return redirect(request, viewer, target)


@router.post("/logout")
async def logout(request: Request, viewer: ViewerDep) -> Response:
    await read_form(request, viewer)
    codec = codec_of(request)
    session = codec.new()
    viewer.session, viewer.csrf, viewer.set_cookie = (
        session,
        codec.csrf_token(session),
        codec.encode(session),
    )
    return redirect(request, viewer, "/ui/login")
