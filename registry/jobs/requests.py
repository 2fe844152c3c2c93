"""Enqueue an export request: plan it, enqueue it idempotently, redo it if its output is gone.

The one path from a request to a queued job, shared by the JSON API and the web UI.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from peftreg.registry.catalog import manifests
from peftreg.registry.db.models import Job
from peftreg.registry.errors import ManifestUnknown, NameUnknown
from peftreg.registry.jobs import queue
from peftreg.registry.jobs.export import EXPORT, ExportRequest, plan_export
from peftreg.registry.state import Services


def _artifact_exists(session: Session, result: dict[str, Any] | None) -> bool:
    if not result:
        return False
    try:
        manifests.get_manifest(session, repository=result["repository"], reference=result["digest"])
    except (ManifestUnknown, NameUnknown):
        return False
    return True


def request_export(
    session: Session, services: Services, request: ExportRequest, *, actor: str
) -> tuple[Job, bool]:
    """(the job, whether it is new); authorization is the caller's (see `export_access`)."""
    planned = plan_export(session, services, request)
    enqueued = queue.enqueue(
        session,
        kind=EXPORT,
        inputs=planned.inputs,
        params=planned.params,
        actor=actor,
        max_attempts=services.settings.job_max_attempts,
        repository=planned.repository,
    )
    job = enqueued.job
    if job.status == "succeeded" and not _artifact_exists(session, job.result):
        queue.requeue(session, job, actor=actor)
    session.flush()
    return job, enqueued.created
