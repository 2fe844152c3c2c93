"""Liveness (`/healthz`: the process answers) and readiness (`/readyz`: its backends do)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool

from peftreg.registry.api.deps import ServicesDep
from peftreg.registry.api.openapi import body
from peftreg.registry.state import Services

router = APIRouter()
STATUS = {
    "type": "object",
    "required": ["status"],
    "properties": {"status": {"enum": ["ok", "unavailable"]}},
    "additionalProperties": {"type": "string"},
}


@router.get("/healthz", responses={200: body("The process answers", ("application/json",), STATUS)})
async def healthz() -> JSONResponse:
    return JSONResponse({"status": "ok"})


def _check(services: Services) -> dict[str, str]:
    checks: dict[str, str] = {}
    try:
        with services.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"unavailable: {type(exc).__name__}"
    try:
        services.store.ping()
        checks["storage"] = "ok"
    except Exception as exc:
        checks["storage"] = f"unavailable: {exc}"
    return checks


@router.get(
    "/readyz",
    responses={
        200: body("The database and the blob store answer", ("application/json",), STATUS),
        503: body("A backend does not answer", ("application/json",), STATUS),
    },
)
async def readyz(services: ServicesDep) -> JSONResponse:
    checks = await run_in_threadpool(_check, services)
    ready = all(value == "ok" for value in checks.values())
    return JSONResponse(
        {"status": "ok" if ready else "unavailable", **checks}, 200 if ready else 503
    )
