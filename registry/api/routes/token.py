"""`/token`: the realm of the Bearer challenge (docker/distribution's token flow).

`GET /token?service=...&scope=...` with HTTP Basic credentials (the password a
peftreg token) or a bearer peftreg token, as docker, skopeo and oras-py ask;
`POST /token` with an OAuth2 password grant form (`grant_type=password`,
`username`, `password`, `service`, `scope`), as containerd and oras-go ask.
"""

from __future__ import annotations

import base64
from datetime import timedelta
from functools import partial
from typing import Annotated
from urllib.parse import parse_qs

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from peftreg.registry.api.deps import ServicesDep, identify, registry_service
from peftreg.registry.api.openapi import failures
from peftreg.registry.auth import registry_tokens
from peftreg.registry.errors import Denied, InvalidRequest, Unauthorized
from peftreg.registry.state import Services

router = APIRouter()
MAX_FORM_BYTES = 64 * 1024


async def _issue(
    request: Request,
    services: Services,
    *,
    authorization: str | None,
    service: str | None,
    scopes: list[str],
) -> JSONResponse:
    ours = registry_service(request, services)
    if service is not None and service != ours:
        raise InvalidRequest(
            f"a token for service {service!r} was asked for; this registry is {ours!r}",
            detail={"service": service, "expected": ours},
        )
    requested = registry_tokens.parse_scopes(scopes)
    principal = await run_in_threadpool(partial(identify, services, authorization, service=ours))
    access = registry_tokens.granted_access(principal, requested)
    lifetime = timedelta(seconds=services.settings.registry_token_seconds)
    token, issued = registry_tokens.issue(
        key=services.token_key, service=ours, principal=principal, access=access, lifetime=lifetime
    )
    return JSONResponse(
        {
            "token": token,
            "access_token": token,
            "expires_in": int(lifetime.total_seconds()),
            "issued_at": issued.isoformat().replace("+00:00", "Z"),
            "scope": " ".join(str(item) for item in access),
        },
        headers={"Cache-Control": "no-store"},
    )


TOKEN_FAILURES = failures(InvalidRequest, Unauthorized, Denied)


@router.get("/token", responses=TOKEN_FAILURES)
async def issue_token(
    request: Request,
    services: ServicesDep,
    service: str | None = None,
    scope: Annotated[list[str] | None, Query()] = None,
) -> JSONResponse:
    """Exchange Basic credentials (password: a peftreg token) or a bearer peftreg token for
    a short-lived registry token carrying the asked-for access the caller holds."""
    return await _issue(
        request,
        services,
        authorization=request.headers.get("authorization"),
        service=service,
        scopes=scope or [],
    )


@router.post("/token", responses=TOKEN_FAILURES)
async def issue_token_oauth2(request: Request, services: ServicesDep) -> JSONResponse:
    """The OAuth2 password grant of the same exchange (form-encoded body)."""
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        raise InvalidRequest(f"the token request form exceeds {MAX_FORM_BYTES} bytes")
    form = {key: values[-1] for key, values in parse_qs(body.decode(errors="replace")).items()}
    grant = form.get("grant_type")
    if grant != "password":
        raise InvalidRequest(
            f"grant_type {grant!r} is not supported; use password (a peftreg token as password)",
            detail={"grant_type": grant},
        )
    username, password = form.get("username", ""), form.get("password", "")
    basic = base64.b64encode(f"{username}:{password}".encode()).decode()
    return await _issue(
        request,
        services,
        authorization=f"Basic {basic}",
        service=form.get("service"),
        scopes=[form.get("scope", "")],
    )
