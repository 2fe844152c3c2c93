"""Jobs: the queue, a job's live progress and log tail (server-sent events), cancel, export."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
from collections.abc import AsyncIterator
from functools import partial
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import ValidationError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from peftreg.registry.api.deps import (
    authorize,
    authorize_any,
    authorize_global_admin,
    in_read_transaction,
    in_transaction,
)
from peftreg.registry.api.draining import draining_of
from peftreg.registry.auth.scopes import Principal, Scope
from peftreg.registry.db.models import Job
from peftreg.registry.errors import InvalidRequest
from peftreg.registry.jobs import queue
from peftreg.registry.jobs.export import ExportRequest, export_access
from peftreg.registry.jobs.requests import request_export
from peftreg.registry.state import Services
from peftreg.registry.web.browse import services_of
from peftreg.registry.web.rendering import SECURITY_HEADERS, WebRoute, page, redirect
from peftreg.registry.web.session import Viewer, get_viewer, read_form

router = APIRouter(prefix="/ui", route_class=WebRoute, include_in_schema=False)
ViewerDep = Annotated[Viewer, Depends(get_viewer)]
SECTIONS = ("running", "queued", "failed", "cancelled", "succeeded")
SECTION_LIMIT = 50
LOG_TAIL = 200
EVENT_INTERVAL = 0.25
STREAM_SECONDS = 300.0


def _check(principal: Principal, scope: Scope, job: Job) -> None:
    """The API's rule: a job is authorized on its output repository, else administrators'."""
    if job.repository is None:
        authorize_global_admin(principal)
    else:
        authorize(principal, scope, job.repository)


def _visible(principal: Principal, job: Job) -> bool:
    if principal.is_global_admin():
        return True
    return job.repository is not None and principal.can("read", job.repository)


def _sections(session: Session, *, principal: Principal) -> dict[str, list[Job]]:
    found = {}
    for status in SECTIONS:
        rows = queue.list_jobs(session, status=status, limit=SECTION_LIMIT * 4)
        found[status] = [row for row in rows if _visible(principal, row)][:SECTION_LIMIT]
    return found


@router.get("/jobs")
async def jobs(request: Request, viewer: ViewerDep) -> Response:
    authorize_any(viewer.principal)
    sections = await in_read_transaction(
        services_of(request), partial(_sections, principal=viewer.principal)
    )
    return page(request, viewer, "jobs.html", {"sections": sections})


def _job_and_logs(session: Session, *, principal: Principal, job_id: str) -> tuple[Job, Any]:
    job = queue.get_job(session, job_id)
    _check(principal, "read", job)
    logs = queue.job_logs(session, job_id, limit=10000)[-LOG_TAIL:]
    return job, logs


@router.get("/jobs/{job_id}")
async def job(job_id: str, request: Request, viewer: ViewerDep) -> Response:
    row, logs = await in_read_transaction(
        services_of(request),
        partial(_job_and_logs, principal=viewer.principal, job_id=job_id),
    )
    can_cancel = row.status not in queue.TERMINAL and (
        viewer.principal.is_global_admin()
        if row.repository is None
        else viewer.principal.can("write", row.repository)
    )
    context = {"job": row, "logs": logs, "can_cancel": can_cancel, "terminal": queue.TERMINAL}
    return page(request, viewer, "job.html", context)


def _snapshot(session: Session, *, job_id: str, after: int) -> dict[str, Any]:
    row = queue.get_job(session, job_id)
    logs = queue.job_logs(session, job_id, after=after, limit=500)
    return {
        "status": row.status,
        "progress": row.progress,
        "message": row.message,
        "error": row.error,
        "logs": [{"id": line.id, "level": line.level, "line": line.line} for line in logs],
    }


async def _events(
    services: Services, job_id: str, after: int, draining: asyncio.Event
) -> AsyncIterator[str]:
    """Until the job ends, the stream's time is up, or the server begins to shut down."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + STREAM_SECONDS
    last: dict[str, Any] | None = None
    while True:
        snapshot = await in_read_transaction(
            services, partial(_snapshot, job_id=job_id, after=after)
        )
        if snapshot["logs"]:
            after = snapshot["logs"][-1]["id"]
        if snapshot != last:
            # The id is the last log line sent: a reconnecting EventSource resumes after it.
            yield f"id: {after}\ndata: {json.dumps(snapshot)}\n\n"
            last = snapshot
        if snapshot["status"] in queue.TERMINAL:
            yield "event: end\ndata: {}\n\n"
            return
        if loop.time() > deadline or draining.is_set():
            return  # the browser's EventSource reconnects
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(draining.wait(), EVENT_INTERVAL)


@router.get("/jobs/{job_id}/events")
async def job_events(job_id: str, request: Request, viewer: ViewerDep, after: int = 0) -> Response:
    """Server-sent events: the job's status, progress and new log lines until it ends."""
    services = services_of(request)

    def check(session: Session) -> None:
        _check(viewer.principal, "read", queue.get_job(session, job_id))

    await in_read_transaction(services, check)
    resumed = request.headers.get("last-event-id", "")
    if resumed.isdigit():
        after = int(resumed)
    headers = {**SECURITY_HEADERS, "X-Accel-Buffering": "no"}
    return StreamingResponse(
        _events(services, job_id, max(0, after), draining_of(request.scope)),
        media_type="text/event-stream",
        headers=headers,
    )


@router.post("/jobs/{job_id}/cancel")
async def cancel(job_id: str, request: Request, viewer: ViewerDep) -> Response:
    await read_form(request, viewer)

    def work(session: Session) -> None:
        _check(viewer.principal, "write", queue.get_job(session, job_id))
        queue.cancel(session, job_id=job_id, actor=viewer.principal.name)

    await in_transaction(services_of(request), work)
    return redirect(request, viewer, f"/ui/jobs/{job_id}")


@router.post("/exports")
async def start_export(request: Request, viewer: ViewerDep) -> Response:
    """Start an export from an adapter's page: the same planning and checks as the API."""
    form = await read_form(request, viewer)
    try:
        body = ExportRequest(
            adapters=[{"reference": form.get("adapter", "")}],
            base=form.get("base", ""),
            dtype=form.get("dtype") or None,
            format=form.get("format") or "safetensors",
            quantize=form.get("quantize") or "none",
            algorithm=form.get("algorithm") or "rtn",
            group_size=form.get("group_size") or 128,
            calibration=form.get("calibration") or None,
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise InvalidRequest(f"{where}: {first['msg']}") from None
    reads, written = export_access(body)
    for repository in reads:
        authorize(viewer.principal, "read", repository)
    authorize(viewer.principal, "write", written)
    await run_in_threadpool(importlib.import_module, "peftreg.merge.compat")
    services = services_of(request)

    def work(session: Session) -> str:
        job, _created = request_export(session, services, body, actor=viewer.principal.name)
        return job.id

    job_id = await in_transaction(services, work)
    return redirect(request, viewer, f"/ui/jobs/{job_id}")
