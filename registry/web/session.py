"""Browser sessions: a signed HttpOnly cookie, the principal it stands for, CSRF tokens.

The cookie holds a random session id and, after login, the API token the
person presented; it is signed with the UI's session key, sent only to
`/ui` (`SameSite=Strict`, `HttpOnly`, `Secure` over HTTPS) and never appears
in a URL or a log. Every form carries a CSRF token derived from the session
id, checked on each write. The principal is resolved exactly as the API
resolves a Bearer token, so scopes mean the same thing in both.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from functools import partial
from urllib.parse import parse_qs

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from peftreg.registry.api.deps import identify, registry_service
from peftreg.registry.auth.scopes import Principal
from peftreg.registry.errors import Denied, Unauthorized
from peftreg.registry.state import Services

COOKIE = "peftreg_ui"
COOKIE_PATH = "/ui"
MAX_AGE_SECONDS = 12 * 3600
MAX_FORM_BYTES = 64 * 1024


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class WebSession:
    sid: str
    token: str | None
    expires: int


class SessionCodec:
    """Encodes sessions as `payload.signature` (HMAC-SHA256 over the payload)."""

    def __init__(self, key: bytes, max_age: int = MAX_AGE_SECONDS) -> None:
        self.key, self.max_age = key, max_age

    def new(self, token: str | None = None) -> WebSession:
        return WebSession(secrets.token_urlsafe(18), token, int(time.time()) + self.max_age)

    def _sign(self, payload: str) -> str:
        return _b64(hmac.new(self.key, payload.encode(), hashlib.sha256).digest())

    def encode(self, session: WebSession) -> str:
        document = {"s": session.sid, "t": session.token, "e": session.expires}
        payload = _b64(json.dumps(document, separators=(",", ":")).encode())
        return f"{payload}.{self._sign(payload)}"

    def decode(self, value: str | None) -> WebSession | None:
        if not value or "." not in value:
            return None
        payload, signature = value.rsplit(".", 1)
        if not hmac.compare_digest(signature, self._sign(payload)):
            return None
        try:
            document = json.loads(_unb64(payload))
            session = WebSession(str(document["s"]), document.get("t"), int(document["e"]))
        except (ValueError, KeyError, TypeError):
            return None
        return session if session.expires > time.time() else None

    def csrf_token(self, session: WebSession) -> str:
        return _b64(hmac.new(self.key, b"csrf:" + session.sid.encode(), hashlib.sha256).digest())


@dataclass
class Viewer:
    """Who is looking at a page, and the session cookie to send back (when it changed)."""

    principal: Principal
    session: WebSession
    csrf: str
    set_cookie: str | None = None
    session_ended: bool = False

    @property
    def logged_in(self) -> bool:
        return self.session.token is not None


def codec_of(request: Request) -> SessionCodec:
    codec: SessionCodec = request.app.state.web_sessions
    return codec


async def get_viewer(request: Request) -> Viewer:
    services: Services = request.app.state.services
    codec = codec_of(request)
    session = codec.decode(request.cookies.get(COOKIE))
    fresh = session is None
    if session is None:
        session = codec.new()
    ended = False
    if session.token is not None:
        try:
            principal = await run_in_threadpool(
                partial(identify, service=registry_service(request, services)),
                services,
                f"Bearer {session.token}",
            )
            return _viewer(codec, principal, session, fresh)
        except Unauthorized:
            session, fresh, ended = codec.new(), True, True
    principal = identify(services, None, service=registry_service(request, services))
    viewer = _viewer(codec, principal, session, fresh)
    viewer.session_ended = ended
    return viewer


def _viewer(codec: SessionCodec, principal: Principal, session: WebSession, fresh: bool) -> Viewer:
    cookie = codec.encode(session) if fresh else None
    return Viewer(principal, session, codec.csrf_token(session), cookie)


async def read_form(request: Request, viewer: Viewer) -> dict[str, str]:
    """The url-encoded form of a write, after its CSRF token is checked."""
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        raise Denied("form too large")
    fields = {key: values[-1] for key, values in parse_qs(body.decode("utf-8", "replace")).items()}
    presented = fields.pop("csrf", "")
    if viewer.set_cookie is not None or not hmac.compare_digest(presented, viewer.csrf):
        raise Denied("the form's CSRF token does not match this session; reload the page")
    return fields
