"""A worker: claims jobs, runs their handlers, and keeps their leases alive.

Each of `concurrency` threads loops: claim a job, run its handler with a
heartbeat thread beside it, record the outcome. The heartbeat extends the
lease, writes the latest progress, and notices a cancellation request or a
lost lease, which the handler sees through `JobContext.cancelled()`.

Shutdown (`stop` set, e.g. on SIGTERM): no new claims; a running job gets
`shutdown_grace` seconds to finish, after which it is interrupted at its next
check and released back to the queue without counting the attempt.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any

from peftreg.registry.catalog import blobs
from peftreg.registry.context import set_request_id
from peftreg.registry.jobs import queue
from peftreg.registry.jobs.context import (
    Completion,
    JobCancelled,
    JobContext,
    JobInputError,
    JobInterrupted,
    LeaseLost,
    ShuttingDown,
)
from peftreg.registry.state import Services

logger = logging.getLogger(__name__)

Handler = Callable[[JobContext], "dict[str, Any] | Completion"]
JobObserver = Callable[[str, str, float], None]  # kind, outcome, seconds


def resolve_device(device: str) -> str:
    """`auto` -> cuda when torch sees a GPU, else cpu; `cuda` without one is an error."""
    if device == "cpu":
        return "cpu"
    import torch

    available = torch.cuda.is_available()
    if device == "cuda" and not available:
        raise RuntimeError("--device cuda was requested but torch sees no CUDA device")
    return "cuda" if available else "cpu"


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class JobWorker:
    def __init__(
        self,
        services: Services,
        handlers: Mapping[str, Handler],
        *,
        worker_id: str | None = None,
        concurrency: int = 1,
        device: str = "auto",
        poll_interval: float | None = None,
        lease_seconds: float | None = None,
        backoff_seconds: float | None = None,
        shutdown_grace: float = 30.0,
        observe: JobObserver | None = None,
    ) -> None:
        settings = services.settings
        self.services = services
        self.handlers = dict(handlers)
        self.worker_id = worker_id or default_worker_id()
        self.concurrency = max(1, concurrency)
        self.requested_device = device
        self._device: str | None = None
        self.poll_interval = poll_interval or settings.worker_poll_seconds
        self.lease = timedelta(seconds=lease_seconds or settings.job_lease_seconds)
        self.backoff = timedelta(
            seconds=settings.job_backoff_seconds if backoff_seconds is None else backoff_seconds
        )
        self.shutdown_grace = shutdown_grace
        self.observe = observe
        self.work_root = settings.resolved_work_dir()
        self._stopping_since: float | None = None

    @property
    def device(self) -> str:
        """Resolved on first use, so an idle worker never imports torch."""
        if self._device is None:
            self._device = resolve_device(self.requested_device)
        return self._device

    # lifecycle ----------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Work until `stop` is set, then finish or release running jobs and return."""
        self.work_root.mkdir(parents=True, exist_ok=True)
        with self.services.transaction() as session:
            queue.register_worker(
                session,
                worker_id=self.worker_id,
                hostname=socket.gethostname(),
                device=self.requested_device,
                concurrency=self.concurrency,
            )
        logger.info(
            "worker %s started (device %s, concurrency %d)",
            self.worker_id,
            self.requested_device,
            self.concurrency,
        )
        threads = [
            threading.Thread(target=self._loop, args=(stop,), name=f"job-{n}", daemon=True)
            for n in range(self.concurrency)
        ]
        for thread in threads:
            thread.start()
        while not stop.wait(self.lease.total_seconds() / 3):
            self._beat_worker()
        self._stopping_since = time.monotonic()
        for thread in threads:
            thread.join()
        self._beat_worker(stopped=True)
        logger.info("worker %s stopped", self.worker_id)

    def _beat_worker(self, *, stopped: bool = False) -> None:
        try:
            with self.services.transaction() as session:
                queue.worker_heartbeat(session, worker_id=self.worker_id, stopped=stopped)
        except Exception:
            logger.exception("worker heartbeat failed")

    def _loop(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                ran = self.run_once()
            except Exception:
                logger.exception("claiming a job failed")
                ran = False
            if not ran:
                stop.wait(self.poll_interval)

    # one job ------------------------------------------------------------------

    def run_once(self) -> bool:
        """Claim one job and run it to an outcome; False when none was available."""
        with self.services.transaction() as session:
            job = queue.claim(
                session,
                worker_id=self.worker_id,
                lease=self.lease,
                kinds=tuple(self.handlers),
            )
            if job is None:
                return False
            job_id, kind, attempt = job.id, job.kind, job.attempts
            params, inputs = dict(job.params), dict(job.inputs)
        work_dir = self.work_root / "jobs" / f"{job_id}-{self.worker_id}"
        shutil.rmtree(work_dir, ignore_errors=True)
        work_dir.mkdir(parents=True)
        context = JobContext(
            job_id=job_id,
            kind=kind,
            attempt=attempt,
            params=params,
            inputs=inputs,
            worker_id=self.worker_id,
            device=self.device,
            services=self.services,
            work_dir=work_dir,
            log=lambda line: self._log(job_id, line),
        )
        set_request_id(job_id)  # log lines and audit rows of this job carry its id
        started = time.monotonic()
        beating = threading.Event()
        beat = threading.Thread(
            target=self._heartbeat, args=(context, beating), name=f"lease-{job_id}", daemon=True
        )
        beat.start()
        try:
            outcome = self._execute(context)
        finally:
            beating.set()
            beat.join()
            shutil.rmtree(work_dir, ignore_errors=True)
            set_request_id(None)
        logger.info("job %s (%s) %s after %.1fs", job_id, kind, outcome, time.monotonic() - started)
        if self.observe is not None:
            self.observe(kind, outcome, time.monotonic() - started)
        return True

    def _execute(self, context: JobContext) -> str:
        handler = self.handlers[context.kind]
        try:
            result = handler(context)
            context.check()
        except JobCancelled:
            return self._record(queue.mark_cancelled, context, "cancelled")
        except LeaseLost:
            return "lease_lost"
        except JobInterrupted as exc:
            return self._record(queue.release, context, "released", reason=exc.reason)
        except Exception as exc:
            return self._failed(context, exc)
        try:
            with self.services.transaction() as session:
                if isinstance(result, dict):
                    done = queue.complete(
                        session, job_id=context.job_id, worker_id=self.worker_id, result=result
                    )
                else:
                    done = queue.complete(
                        session,
                        job_id=context.job_id,
                        worker_id=self.worker_id,
                        result=dict(result.result),
                        finalize=result.finalize,
                    )
        except Exception as exc:
            # Publishing failed (e.g. an output blob vanished): an attempt that failed.
            return self._failed(context, exc)
        return "succeeded" if done else "lease_lost"

    def _failed(self, context: JobContext, exc: Exception) -> str:
        permanent = isinstance(exc, JobInputError) or _is_input_error(exc)
        error = f"{type(exc).__name__}: {exc}"
        if not permanent:
            logger.error("job %s failed: %s", context.job_id, traceback.format_exc())
        with self.services.transaction() as session:
            status = queue.fail(
                session,
                job_id=context.job_id,
                worker_id=self.worker_id,
                error=error,
                retry=not permanent,
                backoff=self.backoff,
            )
        if status is None:
            return "lease_lost"
        return {"queued": "retrying"}.get(status, status)

    def _record(
        self, action: Callable[..., bool], context: JobContext, outcome: str, **extra: str
    ) -> str:
        with self.services.transaction() as session:
            held = action(session, job_id=context.job_id, worker_id=self.worker_id, **extra)
        return outcome if held else "lease_lost"

    def _log(self, job_id: str, line: str) -> None:
        with self.services.transaction() as session:
            queue.log_line(
                session, job_id=job_id, worker_id=self.worker_id, level="info", line=line
            )

    def _heartbeat(self, context: JobContext, done: threading.Event) -> None:
        interval = self.lease.total_seconds() / 3
        while not done.wait(interval):
            if self._stopping_since is not None and (
                time.monotonic() - self._stopping_since > self.shutdown_grace
            ):
                context.interrupt(ShuttingDown)
            progress = context.take_progress()
            try:
                with self.services.transaction() as session:
                    beat = queue.heartbeat(
                        session,
                        job_id=context.job_id,
                        worker_id=self.worker_id,
                        lease=self.lease,
                        progress=progress[0] if progress else None,
                        message=progress[1] if progress else None,
                    )
                    if beat.held:
                        for digest in context.protected():
                            blobs.touch_blob(session, digest=digest)
            except Exception:
                logger.exception("heartbeat of job %s failed", context.job_id)
                continue
            if not beat.held:
                context.interrupt(LeaseLost)
            elif beat.cancel_requested:
                context.interrupt(JobCancelled)


def _is_input_error(exc: Exception) -> bool:
    """Errors that say the request itself is wrong (never worth a retry).

    The library's `InvalidRequest`s, and registry refusals of the output other
    than a vanished blob (which a new attempt uploads again).
    """
    from peftreg.registry.errors import ManifestBlobUnknown, RegistryError
    from peftreg.sdk.errors import InvalidRequest

    if isinstance(exc, ManifestBlobUnknown):
        return False
    return isinstance(exc, InvalidRequest | RegistryError)


def embedded_worker(services: Services) -> JobWorker:
    """The worker `peftreg serve` runs in-process on the embedded default."""
    from peftreg.registry.jobs.handlers import default_handlers

    return JobWorker(
        services,
        default_handlers(),
        device=services.settings.worker_device,
        shutdown_grace=5.0,
        observe=services.metrics.observe_job,
    )
