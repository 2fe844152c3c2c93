"""OCI API root (`/v2/`) and the repository catalog."""

from __future__ import annotations

from typing import Annotated
from urllib.parse import urlencode

from fastapi import APIRouter, Query, Response
from fastapi.responses import JSONResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from peftreg.registry.api.deps import (
    SQL_INTEGER_MAX,
    PrincipalDep,
    ServicesDep,
    authorize_any,
    in_read_transaction,
)
from peftreg.registry.api.openapi import body
from peftreg.registry.db.models import Repository

router = APIRouter()
CATALOG = {
    "type": "object",
    "required": ["repositories"],
    "properties": {"repositories": {"type": "array", "items": {"type": "string"}}},
}


@router.get(
    "/v2/", responses={200: body("The OCI API is here", ("application/json",), {"type": "object"})}
)
async def ping(principal: PrincipalDep) -> Response:
    authorize_any(principal)
    return JSONResponse({}, headers={"Docker-Distribution-API-Version": "registry/2.0"})


@router.get(
    "/v2/_catalog",
    responses={200: body("Repository names, a page", ("application/json",), CATALOG)},
)
async def catalog(
    services: ServicesDep,
    principal: PrincipalDep,
    n: Annotated[int, Query(ge=0, le=SQL_INTEGER_MAX)] = 100,
    last: str | None = None,
) -> Response:
    authorize_any(principal)

    def work(session: Session) -> list[str]:
        names: list[str] = []
        cursor = last
        while len(names) <= n:
            query = select(Repository.name).order_by(Repository.name).limit(500)
            if cursor:
                query = query.where(Repository.name > cursor)
            batch = list(session.scalars(query))
            if not batch:
                break
            names += [name for name in batch if principal.can("read", name)]
            cursor = batch[-1]
        return names

    names = await in_read_transaction(services, work)
    headers = {}
    if len(names) > n:
        names = names[:n]
        if names:  # n=0 asks for an empty page: there is no `last` to continue from
            query = urlencode({"n": n, "last": names[-1]})
            headers["Link"] = f'</v2/_catalog?{query}>; rel="next"'
    return JSONResponse({"repositories": names}, headers=headers)
