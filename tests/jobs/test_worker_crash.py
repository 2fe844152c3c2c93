"""Kill -9 of a worker mid-merge: another worker finishes the job once the lease expires."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from peftreg.manifest import CHECKPOINT_ARTIFACT
from peftreg.sdk.client import Client
from peftreg.sdk.jobs import JobInfo
from tests.fixtures.server import RegistryProcess, start_registry
from tests.jobs.artifacts import push_base_and_adapter

LEASE = "2"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RegistryProcess]:
    process = start_registry(
        tmp_path / "home", {"PEFTREG_EMBEDDED_WORKER": "false", "PEFTREG_JOB_LEASE_SECONDS": LEASE}
    )
    yield process
    process.stop()


def start_worker(server: RegistryProcess, name: str, **env: str) -> subprocess.Popen[bytes]:
    return server.start_worker(
        name, {"PEFTREG_JOB_LEASE_SECONDS": LEASE, "PEFTREG_WORKER_POLL_SECONDS": "0.2", **env}
    )


def wait_for(client: Client, job_id: str, done: object, deadline: float = 120.0) -> JobInfo:
    """Poll the job (with a deadline) until `done(job)` holds."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        job = client.job(job_id)
        if done(job):  # type: ignore[operator]
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} never reached the state; last {job}")


def stored_digests(home: Path) -> set[str]:
    root = home / "storage" / "blobs" / "sha256"
    return {f"sha256:{path.name}" for path in root.glob("*/*") if path.is_file()}


def referenced_digests(client: Client, references: list[str]) -> set[str]:
    found: set[str] = set()
    for reference in references:
        manifest = json.loads(client.get_manifest(reference).content)
        found.add(manifest["config"]["digest"])
        found.update(layer["digest"] for layer in manifest["layers"])
    return found


def test_a_killed_worker_does_not_lose_or_duplicate_the_job(
    server: RegistryProcess, tmp_path: Path
) -> None:
    client = Client(server.url, cache=tmp_path / "cache")
    pushed = push_base_and_adapter(client, tmp_path)
    job, _ = client.export(pushed.adapter_ref, pushed.base_ref)

    doomed = start_worker(server, "doomed", PEFTREG_WORKER_THROTTLE_SECONDS="0.3")
    try:
        wait_for(client, job.id, lambda j: j.status == "running" and j.progress > 0)
    finally:
        os.killpg(doomed.pid, signal.SIGKILL)
        doomed.wait(15)
    assert client.job(job.id).status == "running"  # nobody has noticed yet

    survivor = start_worker(server, "survivor")
    try:
        done = wait_for(client, job.id, lambda j: j.done)
    finally:
        os.killpg(survivor.pid, signal.SIGTERM)
        assert survivor.wait(30) == 0
    assert done.status == "succeeded", done.error
    assert done.attempts == 2
    assert done.result is not None
    assert any("lease expired" in line.line for line in client.job_logs(job.id))

    adapter = client.resolve(pushed.adapter_ref)
    checkpoints = [
        r
        for r in client.referrers("acme/bot", adapter)
        if r.get("artifactType") == CHECKPOINT_ARTIFACT
    ]
    assert [c["digest"] for c in checkpoints] == [done.result["digest"]]
    # Every stored blob belongs to a manifest: nothing partial is visible.
    references = [pushed.base_ref, pushed.adapter_ref, done.result["reference"]]
    assert stored_digests(server.home) == referenced_digests(client, references)
    # The worker that shut down gracefully says so.
    assert "stopped" in (server.home / "survivor.log").read_text()
