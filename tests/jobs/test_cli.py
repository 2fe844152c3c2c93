"""`peftreg export` and `peftreg jobs` against a real server with its embedded worker."""

from __future__ import annotations

import json
from pathlib import Path

from peftreg.sdk.client import Client
from tests.fixtures.server import RegistryProcess
from tests.jobs.artifacts import push_base_and_adapter


def test_export_wait_output_and_jobs_commands(
    run, registry_server: RegistryProcess, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    client = Client(registry_server.url, cache=tmp_path / "cache")
    pushed = push_base_and_adapter(client, tmp_path)

    refused = run("export", pushed.adapter_ref, "--base", pushed.base_ref)
    assert refused.exit_code == 2
    assert "needs --merge" in refused.output

    output = tmp_path / "merged"
    result = run(
        "export",
        pushed.adapter_ref,
        "--base",
        pushed.base_ref,
        "--merge",
        "--wait",
        "-o",
        str(output),
    )
    assert result.exit_code == 0, result.output
    reference = result.stdout.strip().splitlines()[-1]
    assert reference.startswith("acme/bot@sha256:")
    assert (output / "config.json").is_file()
    assert (output / "model.safetensors").is_file()

    listed = run("jobs", "ls")
    assert listed.exit_code == 0, listed.output
    (job_line,) = [line for line in listed.stdout.splitlines() if line.startswith("job_")]
    job_id = job_line.split()[0]
    assert "succeeded" in job_line

    shown = run("jobs", "show", job_id)
    assert shown.exit_code == 0
    assert json.loads(shown.stdout)["result"]["reference"] == reference

    logs = run("jobs", "logs", job_id)
    assert logs.exit_code == 0
    assert "[info] succeeded" in logs.stdout

    cancelled = run("jobs", "cancel", job_id)
    assert cancelled.exit_code == 1
    assert "already succeeded" in cancelled.output

    unknown = run("jobs", "show", "job_nope")
    assert unknown.exit_code == 1
    assert "no job job_nope" in unknown.output

    weights = run(
        "export",
        pushed.adapter_ref,
        "--base",
        pushed.base_ref,
        "--merge",
        "--weight",
        "1",
        "--weight",
        "2",
    )
    assert weights.exit_code == 2
    assert "2 --weight values for 1 adapters" in weights.output


def test_export_against_another_base_fails_with_both_fingerprints(
    run,
    registry_server: RegistryProcess,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    client = Client(registry_server.url, cache=tmp_path / "cache")
    pushed = push_base_and_adapter(client, tmp_path, seed=0)
    other = push_base_and_adapter(client, tmp_path, seed=1, repository="acme/other")
    result = run("export", pushed.adapter_ref, "--base", other.base_ref, "--merge")
    assert result.exit_code == 1
    message = result.output.strip()
    assert len(message.splitlines()) == 1
    assert str(client.base_reference(pushed.base_ref).fingerprint) in message
    assert str(client.base_reference(other.base_ref).fingerprint) in message
