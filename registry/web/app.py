"""Mount the web UI on the service: its routers, static files and session key."""

from __future__ import annotations

import secrets

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from peftreg.registry.settings import Settings
from peftreg.registry.web import browse, jobs, lineage, login, tags, tokens, versions
from peftreg.registry.web.rendering import STATIC, make_environment
from peftreg.registry.web.session import SessionCodec


def install_web_ui(app: FastAPI, settings: Settings) -> None:
    secret = settings.ui_session_secret
    # Without a configured key, sessions last as long as this process (one replica).
    key = secret.get_secret_value().encode() if secret is not None else secrets.token_bytes(32)
    app.state.web_sessions = SessionCodec(key)
    app.state.web_templates = make_environment()
    app.mount("/ui/static", StaticFiles(directory=STATIC), name="ui-static")
    # Specific `/r/{name}/-/...` pages before the repository page that would swallow them.
    for module in (login, versions, tags, lineage, jobs, tokens, browse):
        app.include_router(module.router)
