"""Templates, the responses pages return, and the HTML error page every UI route shares."""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.routing import APIRoute
from jinja2 import Environment, FileSystemLoader, select_autoescape

from peftreg.registry import errors
from peftreg.registry.api.errors import status_and_code
from peftreg.registry.storage.errors import StorageUnavailable
from peftreg.registry.web.session import COOKIE, COOKIE_PATH, MAX_AGE_SECONDS, Viewer

logger = logging.getLogger(__name__)
TEMPLATES = Path(__file__).parent / "templates"
STATIC = Path(__file__).parent / "static"
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def human_size(size: int | None) -> str:
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


def short_digest(digest: str | None) -> str:
    return "-" if not digest else digest.split(":", 1)[-1][:12]


def when(moment: datetime | str | None) -> str:
    if moment is None:
        return "-"
    if isinstance(moment, str):
        return moment[:19].replace("T", " ")
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def repo_url(name: str, *suffix: str) -> str:
    path = "/ui/r/" + quote(name)
    return path + ("/-/" + "/".join(quote(part, safe=":") for part in suffix) if suffix else "")


def make_environment() -> Environment:
    environment = Environment(
        loader=FileSystemLoader(TEMPLATES),
        autoescape=select_autoescape(["html", "svg"]),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    environment.filters.update(size=human_size, short=short_digest, when=when)
    environment.globals.update(repo_url=repo_url)
    return environment


def _with_cookie(response: Response, request: Request, viewer: Viewer | None) -> Response:
    if viewer is not None and viewer.set_cookie is not None:
        response.set_cookie(
            COOKIE,
            viewer.set_cookie,
            max_age=MAX_AGE_SECONDS,
            path=COOKIE_PATH,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
    response.headers.update(SECURITY_HEADERS)
    return response


def page(
    request: Request,
    viewer: Viewer | None,
    template: str,
    context: dict[str, Any],
    status_code: int = 200,
) -> Response:
    environment: Environment = request.app.state.web_templates
    html = environment.get_template(template).render(
        request=request, viewer=viewer, path=request.url.path, **context
    )
    return _with_cookie(HTMLResponse(html, status_code), request, viewer)


def redirect(request: Request, viewer: Viewer | None, url: str) -> Response:
    """303 See Other: after a write, the browser GETs the result."""
    return _with_cookie(RedirectResponse(url, status_code=303), request, viewer)


def error_page(request: Request, status_code: int, code: str, message: str) -> Response:
    context = {"status": status_code, "code": code, "message": message}
    return page(request, None, "error.html", context, status_code)


class WebRoute(APIRoute):
    """Domain errors become HTML pages (the API's status table); a GET needing login redirects."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except errors.Unauthorized as exc:
                if request.method == "GET":
                    target = quote(request.url.path, safe="/")
                    return RedirectResponse(f"/ui/login?next={target}", status_code=303)
                return error_page(request, 401, "UNAUTHORIZED", exc.message)
            except errors.RegistryError as exc:
                status_code, code = status_and_code(exc)
                return error_page(request, status_code, code, exc.message)
            except StorageUnavailable as exc:
                logger.warning("blob store unavailable: %s", exc)
                return error_page(request, 503, "UNAVAILABLE", "the blob store is unavailable")

        return route
