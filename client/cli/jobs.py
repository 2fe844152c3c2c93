"""`peftreg export` and `peftreg jobs ...`: server-side jobs from the command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from peftreg.cli.common import (
    echo_json,
    echo_table,
    emit,
    fail,
    json_option,
    make_client,
    parse_reference,
    to_jsonable,
)
from peftreg.cli.recipe_options import check_calibration, check_format, recipe_options
from peftreg.sdk.jobs import JobInfo


def _describe(job: JobInfo) -> str:
    detail = f"{job.progress:.0%}" + (f" {job.message}" if job.message else "")
    return f"{job.id} {job.status} {detail}".rstrip()


@click.command()
@click.argument("references", nargs=-1, required=True)
@click.option("--base", "base", required=True, help="The registered base: REPO:TAG or REPO@DIGEST.")
@click.option("--merge", is_flag=True, help="Merge the adapter(s) into the base (required).")
@recipe_options
@click.option("--wait", is_flag=True, help="Wait until the job ends.")
@click.option("--timeout", type=float, default=None, help="With --wait: give up after SECONDS.")
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    help="Wait, then pull the checkpoint into this directory.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the job as JSON.")
def export(
    references: tuple[str, ...],
    base: str,
    merge: bool,
    weights: tuple[float, ...],
    dtype: str | None,
    base_quantization: str,
    output_format: str,
    quantize: str,
    group_size: int,
    algorithm: str,
    calibration: str | None,
    calibration_samples: int | None,
    max_sequence_length: int | None,
    wait: bool,
    timeout: float | None,
    output: Path | None,
    as_json: bool,
) -> None:
    """Export REFERENCES merged into --base as a checkpoint (a server-side job).

    `--format gguf --quantize q4_k_m` (or f16, q8_0, q4_0) exports one GGUF
    model file for llama.cpp and Ollama instead. `--quantize int4 --algorithm gptq`
    (or awq) calibrates on `--calibration REF`, a pushed text or JSONL file.
    An identical request returns
    the same job, and once it is done the same artifact. The checkpoint is
    published in the first adapter's repository, with the adapter as its subject.
    """
    if not merge:
        raise fail("export needs --merge (merging into the base is the export there is)", 2)
    if weights and len(weights) != len(references):
        raise fail(f"{len(weights)} --weight values for {len(references)} adapters", 2)
    quantize = check_format(output_format, quantize, dtype)
    check_calibration(quantize, algorithm, calibration)
    for text in (*references, base, *([calibration] if calibration else [])):
        parse_reference(text)
    sources = list(zip(references, weights or [1.0] * len(references), strict=True))
    with make_client() as client:
        job, created = client.export(
            sources,
            base,
            dtype=dtype,
            base_quantization=base_quantization,
            quantize=quantize,
            group_size=group_size,
            algorithm=algorithm,
            output_format=output_format,
            calibration=calibration,
            calibration_samples=calibration_samples,
            max_sequence_length=max_sequence_length,
        )
        click.echo(f"{'queued' if created else 'existing'} job {job.id} ({job.status})", err=True)
        if wait or output is not None:
            last: list[str] = []

            def show(update: JobInfo) -> None:
                line = _describe(update)
                if not last or last[-1] != line:
                    last.append(line)
                    click.echo(line, err=True)

            job = client.wait_job(job.id, timeout=timeout, on_update=show)
        if output is not None and job.result is not None:
            client.pull(job.result["reference"], output)
            click.echo(f"checkpoint in {output}", err=True)
    if as_json:
        echo_json(job)
    elif job.result is not None:
        click.echo(job.result["reference"])
    else:
        click.echo(job.id)


@click.group()
def jobs() -> None:
    """List, inspect, follow and cancel server-side jobs."""


@jobs.command("ls")
@click.option(
    "--status", type=click.Choice(["queued", "running", "succeeded", "failed", "cancelled"])
)
@click.option("--kind")
@click.option("--repository")
@click.option("--json", "as_json", is_flag=True)
def jobs_ls(status: str | None, kind: str | None, repository: str | None, as_json: bool) -> None:
    """Recent jobs, newest first."""
    with make_client() as client:
        found = client.jobs(status=status, kind=kind, repository=repository)
    if as_json:
        echo_json(found)
        return
    echo_table(
        ["ID", "KIND", "STATUS", "PROGRESS", "ATTEMPTS", "REPOSITORY", "CREATED"],
        [
            [
                job.id,
                job.kind,
                job.status,
                f"{job.progress:.0%}",
                f"{job.attempts}/{job.max_attempts}",
                job.repository or "-",
                job.created_at.isoformat(timespec="seconds"),
            ]
            for job in found
        ],
    )


@jobs.command("show")
@click.argument("job_id")
@json_option
def jobs_show(job_id: str, as_json: bool) -> None:
    """Everything about one job (JSON, with or without --json)."""
    del as_json  # the output is JSON either way; the flag is accepted like everywhere
    with make_client() as client:
        echo_json(client.job(job_id))


@jobs.command("logs")
@click.argument("job_id")
@click.option("-f", "--follow", is_flag=True, help="Keep printing until the job ends.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per log line.")
def jobs_logs(job_id: str, follow: bool, as_json: bool) -> None:
    """A job's log lines (kept after it ends, errors included)."""
    import time

    after = 0
    with make_client() as client:
        while True:
            for line in client.job_logs(job_id, after=after):
                if as_json:
                    click.echo(json.dumps(to_jsonable(line), sort_keys=True))
                else:
                    at = line.at.isoformat(timespec="seconds")
                    click.echo(f"{at} [{line.level}] {line.line}")
                after = line.id
            if not follow or client.job(job_id).done:
                break
            time.sleep(1.0)
    sys.stdout.flush()


@jobs.command("cancel")
@click.argument("job_id")
@json_option
def jobs_cancel(job_id: str, as_json: bool) -> None:
    """Cancel a queued job, or ask the worker of a running one to stop."""
    with make_client() as client:
        job = client.cancel_job(job_id)
    emit(as_json, job, f"{job.id} {'cancelled' if job.status == 'cancelled' else 'cancelling'}")
