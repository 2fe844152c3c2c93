"""The job queue on SQLite and PostgreSQL: idempotency, claims, leases, retries, cancels."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from sqlalchemy import select

from peftreg.registry.db.models import Job, JobLog
from peftreg.registry.errors import JobFinished, JobUnknown
from peftreg.registry.jobs import queue
from peftreg.registry.state import Services

LEASE = timedelta(seconds=60)
INPUTS = {"base": {"repository": "acme/base", "digest": "sha256:" + "b" * 64}}


def _enqueue(services: Services, params: dict[str, object] | None = None, attempts: int = 3) -> str:
    with services.transaction() as session:
        job = queue.enqueue(
            session,
            kind="export",
            inputs=INPUTS,
            params=params or {"quantize": "none"},
            actor="tester",
            max_attempts=attempts,
            repository="acme/bot",
        ).job
        return job.id


def _claim(services: Services, worker: str, lease: timedelta = LEASE) -> str | None:
    with services.transaction() as session:
        job = queue.claim(session, worker_id=worker, lease=lease)
        return job.id if job else None


def _job(services: Services, job_id: str) -> Job:
    with services.transaction() as session:
        job = session.get(Job, job_id)
        assert job is not None
        session.expunge(job)
        return job


def test_the_same_request_returns_the_same_job(services: Services) -> None:
    with services.transaction() as session:
        first = queue.enqueue(
            session,
            kind="export",
            inputs=INPUTS,
            params={"a": 1, "b": 2},
            actor="x",
            max_attempts=3,
        )
    with services.transaction() as session:
        again = queue.enqueue(
            session,
            kind="export",
            inputs=INPUTS,
            params={"b": 2, "a": 1},
            actor="y",
            max_attempts=3,
        )
        other = queue.enqueue(
            session,
            kind="export",
            inputs=INPUTS,
            params={"a": 1, "b": 3},
            actor="y",
            max_attempts=3,
        )
    assert first.created
    assert not again.created
    assert other.created
    assert again.job.id == first.job.id
    assert other.job.id != first.job.id
    assert first.job.key == queue.job_key("export", INPUTS, {"b": 2, "a": 1})


def test_a_job_is_claimed_once_and_then_completed(services: Services) -> None:
    job_id = _enqueue(services)
    assert _claim(services, "w1") == job_id
    assert _claim(services, "w2") is None
    with services.transaction() as session:
        assert not queue.complete(session, job_id=job_id, worker_id="w2", result={"x": 1})
        assert queue.complete(session, job_id=job_id, worker_id="w1", result={"x": 1})
    job = _job(services, job_id)
    assert (job.status, job.result, job.progress, job.attempts) == ("succeeded", {"x": 1}, 1.0, 1)
    assert job.finished_at is not None
    assert job.lease_owner is None


def test_concurrent_workers_never_claim_the_same_job(services: Services) -> None:
    job_ids = {_enqueue(services, {"n": n}) for n in range(12)}
    claimed: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(6)

    def work(worker: str) -> None:
        barrier.wait()
        while True:
            job_id = _claim(services, worker)
            if job_id is None:
                return
            with lock:
                claimed.append(job_id)

    threads = [threading.Thread(target=work, args=(f"w{n}",)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(claimed) == sorted(job_ids)


def test_an_expired_lease_goes_back_to_the_queue(services: Services) -> None:
    job_id = _enqueue(services)
    assert _claim(services, "dead", lease=timedelta(seconds=-1)) == job_id
    assert _claim(services, "alive") == job_id
    job = _job(services, job_id)
    assert (job.lease_owner, job.attempts, job.status) == ("alive", 2, "running")
    with services.transaction() as session:
        beat = queue.heartbeat(session, job_id=job_id, worker_id="dead", lease=LEASE)
        assert not beat.held
        assert not queue.complete(session, job_id=job_id, worker_id="dead", result={})
        lines = [
            row.line
            for row in session.execute(select(JobLog).where(JobLog.job_id == job_id)).scalars()
        ]
    assert any("lease expired" in line for line in lines)


def test_an_expired_lease_on_the_last_attempt_fails_the_job(services: Services) -> None:
    job_id = _enqueue(services, attempts=1)
    assert _claim(services, "dead", lease=timedelta(seconds=-1)) == job_id
    assert _claim(services, "other") is None
    job = _job(services, job_id)
    assert job.status == "failed"
    assert "lease of dead expired" in (job.error or "")


def test_failures_retry_with_backoff_then_keep_the_error(services: Services) -> None:
    job_id = _enqueue(services, attempts=2)
    assert _claim(services, "w") == job_id
    with services.transaction() as session:
        status = queue.fail(
            session,
            job_id=job_id,
            worker_id="w",
            error="boom 1",
            retry=True,
            backoff=timedelta(hours=1),
        )
    assert status == "queued"
    assert _claim(services, "w") is None  # backing off
    with services.transaction() as session:
        session.get(Job, job_id).available_at = queue.now()  # type: ignore[union-attr]
    assert _claim(services, "w") == job_id
    with services.transaction() as session:
        status = queue.fail(
            session,
            job_id=job_id,
            worker_id="w",
            error="boom 2",
            retry=True,
            backoff=timedelta(seconds=0),
        )
    assert status == "failed"
    job = _job(services, job_id)
    assert (job.status, job.error, job.attempts) == ("failed", "boom 2", 2)
    with services.transaction() as session:
        lines = [row.line for row in queue.job_logs(session, job_id)]
    assert "boom 1" in lines
    assert "boom 2" in lines


def test_a_permanent_failure_does_not_retry(services: Services) -> None:
    job_id = _enqueue(services, attempts=5)
    _claim(services, "w")
    with services.transaction() as session:
        assert (
            queue.fail(
                session,
                job_id=job_id,
                worker_id="w",
                error="bad input",
                retry=False,
                backoff=timedelta(0),
            )
            == "failed"
        )


def test_cancel_a_queued_job_and_ask_a_running_one_to_stop(services: Services) -> None:
    queued = _enqueue(services, {"n": 1})
    with services.transaction() as session:
        assert queue.cancel(session, job_id=queued, actor="me").status == "cancelled"
    running = _enqueue(services, {"n": 2})
    assert _claim(services, "w") == running
    with services.transaction() as session:
        job = queue.cancel(session, job_id=running, actor="me")
        assert (job.status, job.cancel_requested) == ("running", True)
    with services.transaction() as session:
        assert queue.heartbeat(session, job_id=running, worker_id="w", lease=LEASE).cancel_requested
        assert queue.mark_cancelled(session, job_id=running, worker_id="w")
    with services.transaction() as session, pytest.raises(JobFinished):
        queue.cancel(session, job_id=running, actor="me")
    with services.transaction() as session, pytest.raises(JobUnknown):
        queue.cancel(session, job_id="job_nope", actor="me")


def test_release_does_not_count_the_attempt(services: Services) -> None:
    job_id = _enqueue(services)
    _claim(services, "w")
    with services.transaction() as session:
        assert queue.release(session, job_id=job_id, worker_id="w", reason="shutdown")
    job = _job(services, job_id)
    assert (job.status, job.attempts, job.lease_owner) == ("queued", 0, None)
    assert _claim(services, "w2") == job_id


def test_an_identical_request_requeues_a_failed_job(services: Services) -> None:
    job_id = _enqueue(services, attempts=1)
    _claim(services, "w")
    with services.transaction() as session:
        queue.fail(session, job_id=job_id, worker_id="w", error="x", retry=False, backoff=LEASE)
    assert _enqueue(services, attempts=1) == job_id
    job = _job(services, job_id)
    assert (job.status, job.attempts) == ("queued", 0)


def test_progress_and_queue_depth(services: Services) -> None:
    job_id = _enqueue(services, {"n": 1})
    _enqueue(services, {"n": 2})
    _claim(services, "w")
    with services.transaction() as session:
        queue.heartbeat(
            session, job_id=job_id, worker_id="w", lease=LEASE, progress=0.5, message="half"
        )
        depth = queue.queue_depth(session)
    job = _job(services, job_id)
    assert (job.progress, job.message) == (0.5, "half")
    assert depth == {("export", "running"): 1, ("export", "queued"): 1}


def test_a_claim_skips_past_jobs_that_end_when_their_lease_expires(services: Services) -> None:
    exhausted = _enqueue(services, {"n": 1}, attempts=1)
    assert _claim(services, "dead", lease=timedelta(seconds=-1)) == exhausted
    cancelled = _enqueue(services, {"n": 2})
    assert _claim(services, "dead", lease=timedelta(seconds=-1)) == cancelled
    with services.transaction() as session:
        queue.cancel(session, job_id=cancelled, actor="me")
    fresh = _enqueue(services, {"n": 3})
    assert _claim(services, "alive") == fresh
    assert _job(services, exhausted).status == "failed"
    assert _job(services, cancelled).status == "cancelled"


def test_concurrent_identical_requests_make_one_job(services: Services) -> None:
    barrier = threading.Barrier(6)
    outcomes: list[tuple[str, bool]] = []
    lock = threading.Lock()

    def request() -> None:
        barrier.wait()
        with services.transaction() as session:
            enqueued = queue.enqueue(
                session,
                kind="export",
                inputs=INPUTS,
                params={"same": True},
                actor="t",
                max_attempts=3,
            )
            outcome = (enqueued.job.id, enqueued.created)
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=request) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({job_id for job_id, _ in outcomes}) == 1
    assert sorted(created for _, created in outcomes) == [False] * 5 + [True]
