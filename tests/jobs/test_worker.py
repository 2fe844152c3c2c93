"""The worker runtime with handlers of our own: outcomes, logs, cancellation, shutdown."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

from peftreg.registry.context import current_request_id
from peftreg.registry.db.models import Job
from peftreg.registry.jobs import queue
from peftreg.registry.jobs.context import JobContext, JobInputError
from peftreg.registry.jobs.worker import JobWorker
from peftreg.registry.state import Services


def _enqueue(services: Services, kind: str, attempts: int = 3) -> str:
    with services.transaction() as session:
        return queue.enqueue(
            session,
            kind=kind,
            inputs={},
            params={},
            actor="t",
            max_attempts=attempts,
            repository="acme/bot",
        ).job.id


def _job(services: Services, job_id: str) -> Job:
    with services.transaction() as session:
        job = session.get(Job, job_id)
        assert job is not None
        session.expunge(job)
        return job


def _logs(services: Services, job_id: str) -> list[str]:
    with services.transaction() as session:
        return [row.line for row in queue.job_logs(session, job_id)]


def test_success_records_result_progress_and_logs(services: Services) -> None:
    def handler(context: JobContext) -> dict[str, Any]:
        assert context.work_dir.is_dir()
        assert current_request_id() == context.job_id  # logs and audit rows carry it
        context.log("working")
        context.progress(0.5, "half")
        return {"answer": 42}

    outcomes: list[tuple[str, str]] = []
    worker = JobWorker(
        services,
        {"echo": handler},
        device="cpu",
        observe=lambda kind, outcome, _s: outcomes.append((kind, outcome)),
    )
    job_id = _enqueue(services, "echo")
    assert worker.run_once()
    assert not worker.run_once()
    job = _job(services, job_id)
    assert (job.status, job.result) == ("succeeded", {"answer": 42})
    assert "working" in _logs(services, job_id)
    assert outcomes == [("echo", "succeeded")]
    assert not any((services.settings.resolved_work_dir() / "jobs").iterdir())


def test_a_crash_retries_and_the_last_error_is_kept(services: Services) -> None:
    calls: list[int] = []

    def handler(context: JobContext) -> dict[str, Any]:
        calls.append(context.attempt)
        raise RuntimeError(f"disk full on attempt {context.attempt}")

    worker = JobWorker(services, {"flaky": handler}, device="cpu", backoff_seconds=0)
    job_id = _enqueue(services, "flaky", attempts=2)
    assert worker.run_once()
    assert _job(services, job_id).status == "queued"
    assert worker.run_once()
    job = _job(services, job_id)
    assert calls == [1, 2]
    assert job.status == "failed"
    assert job.error == "RuntimeError: disk full on attempt 2"
    assert "RuntimeError: disk full on attempt 1" in _logs(services, job_id)


def test_bad_input_fails_at_once(services: Services) -> None:
    def handler(context: JobContext) -> dict[str, Any]:
        raise JobInputError("the base is not a base")

    worker = JobWorker(services, {"bad": handler}, device="cpu")
    job_id = _enqueue(services, "bad", attempts=5)
    assert worker.run_once()
    job = _job(services, job_id)
    assert (job.status, job.attempts) == ("failed", 1)
    assert "the base is not a base" in (job.error or "")


def test_a_cancel_request_stops_a_running_handler(services: Services) -> None:
    started = threading.Event()

    def handler(context: JobContext) -> dict[str, Any]:
        started.set()
        while not context.cancelled():
            threading.Event().wait(0.01)
        context.check()
        return {}

    worker = JobWorker(services, {"long": handler}, device="cpu", lease_seconds=0.3)
    job_id = _enqueue(services, "long")
    runner = threading.Thread(target=worker.run_once)
    runner.start()
    assert started.wait(10)
    with services.transaction() as session:
        queue.cancel(session, job_id=job_id, actor="me")
    runner.join(10)
    assert not runner.is_alive()
    assert _job(services, job_id).status == "cancelled"


def test_shutdown_releases_a_job_that_outlives_the_grace(services: Services) -> None:
    started = threading.Event()

    def handler(context: JobContext) -> dict[str, Any]:
        started.set()
        while not context.cancelled():
            threading.Event().wait(0.01)
        context.check()
        return {}

    worker = JobWorker(
        services,
        {"long": handler},
        device="cpu",
        lease_seconds=0.3,
        shutdown_grace=0.0,
        poll_interval=0.05,
    )
    job_id = _enqueue(services, "long")
    stop = threading.Event()
    runner = threading.Thread(target=worker.run, args=(stop,))
    runner.start()
    assert started.wait(10)
    stop.set()
    runner.join(10)
    assert not runner.is_alive()
    job = _job(services, job_id)
    assert (job.status, job.attempts, job.lease_owner) == ("queued", 0, None)
    assert any("released" in line for line in _logs(services, job_id))


def test_a_worker_that_lost_its_lease_publishes_nothing(services: Services) -> None:
    finalized: list[str] = []

    class Outcome:
        result = {"x": 1}

        def finalize(self, session: object) -> None:
            finalized.append("published")

    def handler(context: JobContext) -> Outcome:
        with services.transaction() as session:  # another worker takes the job meanwhile
            job = session.get(Job, context.job_id)
            assert job is not None
            job.lease_expires_at = queue.now() - timedelta(seconds=1)
        with services.transaction() as session:
            assert queue.claim(session, worker_id="thief", lease=timedelta(minutes=1))
        return Outcome()

    worker = JobWorker(services, {"x": handler}, device="cpu")
    job_id = _enqueue(services, "x")
    assert worker.run_once()
    assert finalized == []
    assert _job(services, job_id).lease_owner == "thief"


def test_a_failure_while_publishing_is_recorded_not_stuck(services: Services) -> None:
    class Outcome:
        result = {"x": 1}

        def finalize(self, session: object) -> None:
            raise RuntimeError("the output blob vanished")

    worker = JobWorker(services, {"x": lambda context: Outcome()}, device="cpu", backoff_seconds=0)
    job_id = _enqueue(services, "x", attempts=1)
    assert worker.run_once()
    job = _job(services, job_id)
    assert job.status == "failed"
    assert job.error == "RuntimeError: the output blob vanished"
    assert job.result is None


def test_output_blobs_are_kept_from_gc_while_the_job_runs(services: Services) -> None:
    from datetime import UTC, datetime

    from peftreg.digest import Digest
    from peftreg.registry.db.models import Blob

    digest = Digest.of_bytes(b"an early shard")
    old = datetime(2020, 1, 1, tzinfo=UTC)
    with services.transaction() as session:
        session.add(Blob(digest=str(digest), size=14, created_at=old, touched_at=old))
    beats = threading.Event()

    def handler(context: JobContext) -> dict[str, Any]:
        context.protect(digest)
        while not beats.is_set():
            with services.transaction() as session:
                blob = session.get(Blob, str(digest))
                assert blob is not None
                if blob.touched_at > old:
                    beats.set()
            threading.Event().wait(0.02)
        return {}

    worker = JobWorker(services, {"x": handler}, device="cpu", lease_seconds=0.3)
    job_id = _enqueue(services, "x")
    assert worker.run_once()
    assert beats.is_set()
    assert _job(services, job_id).status == "succeeded"
