"""`GET /token`: the realm of the Bearer challenge (docker/distribution's token flow)."""

from __future__ import annotations

from datetime import timedelta
from functools import partial
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from peftreg.registry.api.deps import ServicesDep, identify, registry_service
from peftreg.registry.auth import registry_tokens
from peftreg.registry.errors import InvalidRequest

router = APIRouter()


@router.get("/token")
async def issue_token(
    request: Request,
    services: ServicesDep,
    service: str | None = None,
    scope: Annotated[list[str] | None, Query()] = None,
) -> JSONResponse:
    """Exchange Basic credentials (password: a peftreg token) or a bearer peftreg token for
    a short-lived registry token carrying the asked-for access the caller holds."""
    ours = registry_service(request, services)
    if service is not None and service != ours:
        raise InvalidRequest(
            f"a token for service {service!r} was asked for; this registry is {ours!r}",
            detail={"service": service, "expected": ours},
        )
    requested = registry_tokens.parse_scopes(scope or [])
    principal = await run_in_threadpool(
        partial(identify, services, request.headers.get("authorization"), service=ours)
    )
    access = registry_tokens.granted_access(principal, requested)
    lifetime = timedelta(seconds=services.settings.registry_token_seconds)
    token, issued = registry_tokens.issue(
        key=services.token_key,
        service=ours,
        principal=principal,
        access=access,
        lifetime=lifetime,
    )
    return JSONResponse(
        {
            "token": token,
            "access_token": token,
            "expires_in": int(lifetime.total_seconds()),
            "issued_at": issued.isoformat().replace("+00:00", "Z"),
        },
        headers={"Cache-Control": "no-store"},
    )
