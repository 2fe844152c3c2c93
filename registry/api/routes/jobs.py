"""Jobs API: request an export, list and inspect jobs, read their logs, cancel them.

- `POST /api/v1/exports` plans the export (references resolved to digests,
  compatibility checked) and enqueues it; an identical request returns the
  same job (200 instead of 202), and a finished one its artifact.
- Reading a job needs read access to its output repository; requesting an
  export needs read access to every source and write access to the output
  repository; cancelling needs write access.
"""

from __future__ import annotations

import importlib
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from peftreg.registry.api.deps import (
    SQL_INTEGER_MAX,
    PrincipalDep,
    ServicesDep,
    authorize,
    authorize_any,
    authorize_global_admin,
    in_read_transaction,
    in_transaction,
)
from peftreg.registry.api.openapi import failures
from peftreg.registry.auth.scopes import Principal, Scope
from peftreg.registry.db.models import Job
from peftreg.registry.errors import (
    BaseIncompatible,
    DigestInvalid,
    JobFinished,
    JobInvalid,
    JobUnknown,
    ManifestUnknown,
    NameInvalid,
    NameUnknown,
    TagInvalid,
)
from peftreg.registry.jobs import queue, requests
from peftreg.registry.jobs.export import ExportRequest, export_access

router = APIRouter(prefix="/api/v1", tags=["jobs"])


class JobOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    kind: str
    status: str
    repository: str | None
    inputs: dict[str, Any]
    params: dict[str, Any]
    attempts: int
    max_attempts: int
    progress: float
    message: str | None
    error: str | None
    result: dict[str, Any] | None
    cancel_requested: bool
    created_by: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    lease_owner: str | None


class JobLogOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    at: datetime
    attempt: int
    level: str
    line: str


def _check(principal: Principal, scope: Scope, job: Job) -> None:
    """Authorize on the job's output repository; jobs without one are the administrators'."""
    if job.repository is None:
        authorize_global_admin(principal)
    else:
        authorize(principal, scope, job.repository)


@router.post(
    "/exports",
    response_model=JobOut,
    responses={
        202: {"model": JobOut, "description": "A new job, queued"},
        **failures(
            NameInvalid,
            NameUnknown,
            TagInvalid,
            DigestInvalid,
            ManifestUnknown,
            JobInvalid,
            BaseIncompatible,
        ),
    },
)
async def request_export(
    body: ExportRequest, services: ServicesDep, principal: PrincipalDep
) -> JSONResponse:
    reads, written = export_access(body)
    for repository in reads:
        authorize(principal, "read", repository)
    authorize(principal, "write", written)
    # The compatibility check needs the merge library (and torch): load it before
    # the transaction, not while holding SQLite's write lock.
    await run_in_threadpool(importlib.import_module, "peftreg.merge.compat")

    def work(session: Session) -> tuple[JobOut, bool]:
        job, created = requests.request_export(session, services, body, actor=principal.name)
        return JobOut.model_validate(job), created

    job, created = await in_transaction(services, work)
    return JSONResponse(job.model_dump(mode="json"), status_code=202 if created else 200)


@router.get("/jobs", response_model=list[JobOut])
async def list_jobs(
    services: ServicesDep,
    principal: PrincipalDep,
    status: str | None = None,
    kind: str | None = None,
    repository: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[JobOut]:
    authorize_any(principal)
    if repository is not None:
        authorize(principal, "read", repository)

    def work(session: Session) -> list[JobOut]:
        admin = principal.is_global_admin()
        rows = queue.list_jobs(
            session,
            status=status,
            kind=kind,
            repositories=[repository] if repository else None,
            limit=limit if admin or repository else limit * 10,
        )
        visible = [
            row
            for row in rows
            if admin or (row.repository is not None and principal.can("read", row.repository))
        ]
        return [JobOut.model_validate(row) for row in visible[:limit]]

    return await in_read_transaction(services, work)


@router.get("/jobs/{job_id}", response_model=JobOut, responses=failures(JobUnknown))
async def get_job(job_id: str, services: ServicesDep, principal: PrincipalDep) -> JobOut:
    def work(session: Session) -> JobOut:
        job = queue.get_job(session, job_id)
        _check(principal, "read", job)
        return JobOut.model_validate(job)

    return await in_read_transaction(services, work)


@router.get("/jobs/{job_id}/logs", response_model=list[JobLogOut], responses=failures(JobUnknown))
async def get_job_logs(
    job_id: str,
    services: ServicesDep,
    principal: PrincipalDep,
    after: Annotated[int, Query(ge=0, le=SQL_INTEGER_MAX)] = 0,
    limit: Annotated[int, Query(ge=1, le=10000)] = 1000,
) -> list[JobLogOut]:
    def work(session: Session) -> list[JobLogOut]:
        _check(principal, "read", queue.get_job(session, job_id))
        return [
            JobLogOut.model_validate(row)
            for row in queue.job_logs(session, job_id, after=after, limit=limit)
        ]

    return await in_read_transaction(services, work)


@router.post(
    "/jobs/{job_id}/cancel", response_model=JobOut, responses=failures(JobUnknown, JobFinished)
)
async def cancel_job(job_id: str, services: ServicesDep, principal: PrincipalDep) -> JobOut:
    def work(session: Session) -> JobOut:
        _check(principal, "write", queue.get_job(session, job_id))
        job = queue.cancel(session, job_id=job_id, actor=principal.name)
        session.flush()
        return JobOut.model_validate(job)

    return await in_transaction(services, work)
