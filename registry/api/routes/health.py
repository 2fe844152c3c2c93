"""Liveness (`/healthz`: the process answers) and readiness (`/readyz`: its backends do)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool

from peftreg.registry.api.deps import ServicesDep
from peftreg.registry.state import Services

router = APIRouter()


@router.get("/healthz", include_in_schema=False)
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


@router.get("/readyz", include_in_schema=False)
async def readyz(services: ServicesDep) -> JSONResponse:
    checks = await run_in_threadpool(_check, services)
    ready = all(value == "ok" for value in checks.values())
    return JSONResponse(
        {"status": "ok" if ready else "unavailable", **checks}, 200 if ready else 503
    )
