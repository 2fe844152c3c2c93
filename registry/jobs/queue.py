"""The job queue: rows in the `jobs` table, claimed by workers under a lease.

- `enqueue` is idempotent: the key is sha256 over (kind, inputs, parameters),
  so the same request returns the same job; a job that failed or was
  cancelled is queued again by a new identical request.
- `claim` takes the oldest available job: one that is queued and past its
  backoff, or running with an expired lease (its worker died). On
  PostgreSQL the candidate row is locked with `FOR UPDATE SKIP LOCKED`, so
  concurrent workers never wait on each other; on SQLite every write
  transaction is `BEGIN IMMEDIATE` and the claim is a conditional `UPDATE`
  that only succeeds if the row is still claimable.
- Every state change after a claim is conditional on the lease owner, so a
  worker that lost its lease (it stalled past the expiry and another worker
  took the job) can no longer complete, fail or log progress for it.
- A failure retries with exponential backoff until `max_attempts`; the last
  error is kept. A lease that expires counts as a failed attempt.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from peftreg.registry.db.models import Job, JobLog, Worker
from peftreg.registry.db.upsert import insert_ignore
from peftreg.registry.errors import JobFinished, JobUnknown

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
MAX_BACKOFF = timedelta(minutes=10)
MAX_LOG_LINE = 4000


def now() -> datetime:
    return datetime.now(UTC)


def job_key(kind: str, inputs: Mapping[str, Any], params: Mapping[str, Any]) -> str:
    """sha256 over the canonical JSON of (kind, inputs, parameters)."""
    document = json.dumps(
        {"kind": kind, "inputs": inputs, "params": params},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return "sha256:" + hashlib.sha256(document.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Enqueued:
    job: Job
    created: bool  # False: an identical request already had this job


def enqueue(
    session: Session,
    *,
    kind: str,
    inputs: Mapping[str, Any],
    params: Mapping[str, Any],
    actor: str,
    max_attempts: int,
    repository: str | None = None,
) -> Enqueued:
    key = job_key(kind, inputs, params)
    moment = now()
    created = insert_ignore(
        session,
        Job,
        id="job_" + uuid.uuid4().hex,
        key=key,
        kind=kind,
        status="queued",
        repository=repository,
        params=dict(params),
        inputs=dict(inputs),
        created_by=actor,
        created_at=moment,
        available_at=moment,
        attempts=0,
        max_attempts=max_attempts,
        progress=0.0,
        cancel_requested=False,
    )
    job = session.execute(select(Job).where(Job.key == key).with_for_update()).scalar_one()
    if not created and job.status in ("failed", "cancelled"):
        requeue(session, job, actor=actor)
    return Enqueued(job, created)


def requeue(session: Session, job: Job, *, actor: str) -> None:
    """Queue an ended job again (a new identical request, or its artifact was deleted)."""
    append_log(session, job, level="info", line=f"queued again by {actor} (was {job.status})")
    job.status = "queued"
    job.available_at = now()
    job.attempts = 0
    job.cancel_requested = False
    job.finished_at = None
    job.lease_owner = None
    job.lease_expires_at = None
    job.progress = 0.0
    job.message = None
    job.result = None


def _claimable(moment: datetime) -> Any:
    return or_(
        and_(Job.status == "queued", Job.available_at <= moment),
        and_(Job.status == "running", Job.lease_expires_at < moment),
    )


def claim(
    session: Session,
    *,
    worker_id: str,
    lease: timedelta,
    kinds: tuple[str, ...] | None = None,
) -> Job | None:
    """Lease the oldest available job to `worker_id`, or return None."""
    moment = now()
    query = select(Job).where(_claimable(moment))
    if kinds:
        query = query.where(Job.kind.in_(kinds))
    query = query.order_by(Job.available_at, Job.created_at).limit(1)
    if session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True)
    while True:
        job = session.execute(query).scalar_one_or_none()
        if job is None:
            return None
        if job.status == "running" and _end_abandoned(session, job):
            continue  # it ended: look at the next candidate
        return _take(session, job, worker_id=worker_id, lease=lease, moment=moment)


def _end_abandoned(session: Session, job: Job) -> bool:
    """End a job whose worker vanished, when it may not run again; whether it ended."""
    if job.cancel_requested:
        _finish(session, job, "cancelled", error="cancelled on request")
        return True
    if job.attempts >= job.max_attempts:
        _finish(
            session,
            job,
            "failed",
            error=f"the lease of {job.lease_owner} expired on attempt {job.attempts} of "
            f"{job.max_attempts}; the worker stopped without reporting",
        )
        return True
    return False


def _take(
    session: Session, job: Job, *, worker_id: str, lease: timedelta, moment: datetime
) -> Job | None:
    expired = job.status == "running"
    claimed = session.execute(
        update(Job)
        .where(Job.id == job.id, _claimable(moment))
        .values(
            status="running",
            attempts=Job.attempts + 1,
            lease_owner=worker_id,
            lease_expires_at=moment + lease,
            heartbeat_at=moment,
            started_at=func.coalesce(Job.started_at, moment),
        )
        .execution_options(synchronize_session=False)
    )
    if getattr(claimed, "rowcount", 0) != 1:
        return None
    session.refresh(job)
    if expired:
        append_log(
            session,
            job,
            level="warning",
            line=f"the previous worker's lease expired; attempt {job.attempts} by {worker_id}",
        )
    else:
        append_log(session, job, level="info", line=f"attempt {job.attempts} by {worker_id}")
    return job


def _owned(session: Session, job_id: str, worker_id: str) -> Job | None:
    job = session.get(Job, job_id, with_for_update=True)
    if job is None or job.status != "running" or job.lease_owner != worker_id:
        return None
    return job


@dataclass(frozen=True)
class Beat:
    held: bool  # False: the lease is gone (expired and taken, or the job ended)
    cancel_requested: bool


def heartbeat(
    session: Session,
    *,
    job_id: str,
    worker_id: str,
    lease: timedelta,
    progress: float | None = None,
    message: str | None = None,
) -> Beat:
    job = _owned(session, job_id, worker_id)
    if job is None:
        return Beat(held=False, cancel_requested=False)
    moment = now()
    job.heartbeat_at = moment
    job.lease_expires_at = moment + lease
    if progress is not None:
        job.progress = max(0.0, min(1.0, progress))
    if message is not None:
        job.message = message[:MAX_LOG_LINE]
    return Beat(held=True, cancel_requested=job.cancel_requested)


def complete(
    session: Session,
    *,
    job_id: str,
    worker_id: str,
    result: dict[str, Any],
    finalize: Callable[[Session], None] | None = None,
) -> bool:
    """Mark the job succeeded, running `finalize` first in the same transaction.

    `finalize` (e.g. putting the output manifest) runs only while the lease is
    held, so a worker that lost its job publishes nothing.
    """
    job = _owned(session, job_id, worker_id)
    if job is None:
        return False
    if finalize is not None:
        finalize(session)
    job.progress = 1.0
    _finish(session, job, "succeeded", result=result)
    return True


def fail(
    session: Session,
    *,
    job_id: str,
    worker_id: str,
    error: str,
    retry: bool,
    backoff: timedelta,
) -> JobStatus | None:
    """Record a failed attempt: queued again after a backoff, or failed for good."""
    job = _owned(session, job_id, worker_id)
    if job is None:
        return None
    append_log(session, job, level="error", line=error)
    if job.cancel_requested:
        _finish(session, job, "cancelled", error=error)
        return "cancelled"
    if retry and job.attempts < job.max_attempts:
        delay = min(MAX_BACKOFF, backoff * (2 ** (job.attempts - 1)))
        job.status = "queued"
        job.error = error
        job.available_at = now() + delay
        job.lease_owner = None
        job.lease_expires_at = None
        append_log(
            session,
            job,
            level="info",
            line=f"retrying in {delay.total_seconds():.0f}s "
            f"(attempt {job.attempts} of {job.max_attempts} failed)",
        )
        return "queued"
    _finish(session, job, "failed", error=error)
    return "failed"


def release(session: Session, *, job_id: str, worker_id: str, reason: str) -> bool:
    """Give a running job back to the queue without counting the attempt."""
    job = _owned(session, job_id, worker_id)
    if job is None:
        return False
    append_log(session, job, level="warning", line=f"released by {worker_id}: {reason}")
    job.status = "queued"
    job.attempts = max(0, job.attempts - 1)
    job.available_at = now()
    job.lease_owner = None
    job.lease_expires_at = None
    return True


def mark_cancelled(session: Session, *, job_id: str, worker_id: str) -> bool:
    job = _owned(session, job_id, worker_id)
    if job is None:
        return False
    _finish(session, job, "cancelled", error="cancelled on request")
    return True


def cancel(session: Session, *, job_id: str, actor: str) -> Job:
    """Cancel a queued job now; ask the worker of a running one to stop."""
    job = session.get(Job, job_id, with_for_update=True)
    if job is None:
        raise JobUnknown(f"no job {job_id}", detail={"job": job_id})
    if job.status in TERMINAL:
        raise JobFinished(
            f"job {job_id} already {job.status}", detail={"job": job_id, "status": job.status}
        )
    append_log(session, job, level="info", line=f"cancellation requested by {actor}")
    if job.status == "queued":
        _finish(session, job, "cancelled", error="cancelled on request")
    else:
        job.cancel_requested = True
    return job


def _finish(
    session: Session,
    job: Job,
    status: JobStatus,
    *,
    error: str | None = None,
    result: dict[str, Any] | None = None,
) -> None:
    job.status = status
    job.finished_at = now()
    job.lease_owner = None
    job.lease_expires_at = None
    if error is not None:
        job.error = error
    if result is not None:
        job.result = result
        job.error = None
    append_log(session, job, level="info" if status == "succeeded" else "error", line=status)


def append_log(session: Session, job: Job, *, level: str, line: str) -> None:
    session.add(
        JobLog(job_id=job.id, at=now(), attempt=job.attempts, level=level, line=line[:MAX_LOG_LINE])
    )


def log_line(session: Session, *, job_id: str, worker_id: str, level: str, line: str) -> bool:
    job = _owned(session, job_id, worker_id)
    if job is None:
        return False
    append_log(session, job, level=level, line=line)
    return True


def get_job(session: Session, job_id: str) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise JobUnknown(f"no job {job_id}", detail={"job": job_id})
    return job


def job_logs(session: Session, job_id: str, *, after: int = 0, limit: int = 1000) -> list[JobLog]:
    get_job(session, job_id)
    return list(
        session.execute(
            select(JobLog)
            .where(JobLog.job_id == job_id, JobLog.id > after)
            .order_by(JobLog.id)
            .limit(limit)
        ).scalars()
    )


def list_jobs(
    session: Session,
    *,
    status: str | None = None,
    kind: str | None = None,
    repositories: list[str] | None = None,
    limit: int = 100,
) -> list[Job]:
    query = select(Job)
    if status:
        query = query.where(Job.status == status)
    if kind:
        query = query.where(Job.kind == kind)
    if repositories is not None:
        query = query.where(Job.repository.in_(repositories))
    return list(session.execute(query.order_by(Job.created_at.desc()).limit(limit)).scalars())


def queue_depth(session: Session) -> dict[tuple[str, str], int]:
    """(kind, status) -> count, for queued and running jobs."""
    rows = session.execute(
        select(Job.kind, Job.status, func.count())
        .where(Job.status.in_(("queued", "running")))
        .group_by(Job.kind, Job.status)
    ).all()
    return {(kind, status): int(count) for kind, status, count in rows}


def register_worker(
    session: Session, *, worker_id: str, hostname: str, device: str, concurrency: int
) -> None:
    moment = now()
    session.merge(
        Worker(
            id=worker_id,
            hostname=hostname,
            device=device,
            concurrency=concurrency,
            started_at=moment,
            heartbeat_at=moment,
            stopped_at=None,
        )
    )


def worker_heartbeat(session: Session, *, worker_id: str, stopped: bool = False) -> None:
    worker = session.get(Worker, worker_id)
    if worker is None:
        return
    worker.heartbeat_at = now()
    if stopped:
        worker.stopped_at = worker.heartbeat_at


def worker_heartbeats(
    session: Session, *, since: timedelta = timedelta(hours=1)
) -> dict[str, float]:
    """worker id -> last heartbeat (unix seconds) for workers seen recently and not stopped."""
    rows = session.execute(
        select(Worker.id, Worker.heartbeat_at).where(
            Worker.stopped_at.is_(None), Worker.heartbeat_at >= now() - since
        )
    ).all()
    return {worker_id: at.timestamp() for worker_id, at in rows}
