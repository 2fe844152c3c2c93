"""Jobs through the JSON API: request exports, follow jobs, read logs, cancel."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict

from peftreg.sdk.errors import PeftregError
from peftreg.sdk.http import HttpSession

TERMINAL = ("succeeded", "failed", "cancelled")


class JobInfo(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str
    kind: str
    status: str
    repository: str | None = None
    inputs: dict[str, Any] = {}
    params: dict[str, Any] = {}
    attempts: int = 0
    max_attempts: int = 0
    progress: float = 0.0
    message: str | None = None
    error: str | None = None
    result: dict[str, Any] | None = None
    cancel_requested: bool = False
    created_by: str = ""
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    lease_owner: str | None = None

    @property
    def done(self) -> bool:
        return self.status in TERMINAL


class JobLogLine(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: int
    at: datetime
    attempt: int
    level: str
    line: str


class JobFailed(PeftregError):
    """A job that ended without succeeding; the message carries its error."""

    def __init__(self, job: JobInfo) -> None:
        super().__init__(f"job {job.id} {job.status}: {job.error or 'no error recorded'}")
        self.job = job


class JobWaitTimeout(PeftregError):
    """The job did not finish within the time given."""


def request_export(
    http: HttpSession,
    adapters: Sequence[tuple[str, float]],
    base: str,
    *,
    dtype: str | None = None,
    base_quantization: str = "none",
    quantize: str = "none",
    group_size: int = 128,
    algorithm: str = "rtn",
    output_format: str = "safetensors",
    calibration: str | None = None,
    calibration_samples: int | None = None,
    max_sequence_length: int | None = None,
) -> tuple[JobInfo, bool]:
    """(job, created): an identical earlier request returns its job with created False.

    `calibration` (the reference of a text or JSONL artifact) is what gptq and awq
    calibrate on; the sample count and window length default to the server's."""
    body: dict[str, Any] = {
        "adapters": [{"reference": ref, "weight": weight} for ref, weight in adapters],
        "base": base,
        "dtype": dtype,
        "base_quantization": base_quantization,
        "quantize": quantize,
        "group_size": group_size,
        "algorithm": algorithm,
    }
    if output_format != "safetensors":
        body["format"] = output_format
    if calibration is not None:
        body["calibration"] = calibration
    if calibration_samples is not None:
        body["calibration_samples"] = calibration_samples
    if max_sequence_length is not None:
        body["max_sequence_length"] = max_sequence_length
    response = http.request("POST", "/api/v1/exports", json_body=body, idempotent=True)
    return JobInfo.model_validate(response.json()), response.status_code == 202


def get_job(http: HttpSession, job_id: str) -> JobInfo:
    return JobInfo.model_validate(http.request("GET", f"/api/v1/jobs/{job_id}").json())


def list_jobs(
    http: HttpSession,
    *,
    status: str | None = None,
    kind: str | None = None,
    repository: str | None = None,
    limit: int = 100,
) -> list[JobInfo]:
    params = {"limit": str(limit)}
    for key, value in (("status", status), ("kind", kind), ("repository", repository)):
        if value:
            params[key] = value
    response = http.request("GET", "/api/v1/jobs", params=params)
    return [JobInfo.model_validate(item) for item in response.json()]


def job_logs(http: HttpSession, job_id: str, *, after: int = 0) -> list[JobLogLine]:
    response = http.request("GET", f"/api/v1/jobs/{job_id}/logs", params={"after": str(after)})
    return [JobLogLine.model_validate(item) for item in response.json()]


def cancel_job(http: HttpSession, job_id: str) -> JobInfo:
    response = http.request("POST", f"/api/v1/jobs/{job_id}/cancel", idempotent=True)
    return JobInfo.model_validate(response.json())


def wait_job(
    http: HttpSession,
    job_id: str,
    *,
    timeout: float | None = None,
    interval: float = 0.5,
    on_update: Callable[[JobInfo], None] | None = None,
) -> JobInfo:
    """Poll until the job ends; raise `JobFailed` unless it succeeded."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        job = get_job(http, job_id)
        if on_update is not None:
            on_update(job)
        if job.done:
            if job.status != "succeeded":
                raise JobFailed(job)
            return job
        if deadline is not None and time.monotonic() > deadline:
            raise JobWaitTimeout(f"job {job_id} still {job.status} after {timeout:.0f}s")
        time.sleep(interval)
