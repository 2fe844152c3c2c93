"""Server-side maintenance: `peftreg gc` and `peftreg fsck`.

Like `peftreg db`, they act on the database and blob store named by the
`PEFTREG_*` settings (run them where the server runs, or as a Kubernetes
CronJob), and import the registry package only when invoked. Invalid
settings, an unreachable database or blob store: one line on stderr and
exit 1, never a traceback.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import click

from peftreg.cli.common import EXIT_ERROR, echo_json, fail, human_size

if TYPE_CHECKING:
    from peftreg.registry.state import Services

MIN_GRACE = timedelta(minutes=10)
"""Shorter grace periods need `--force`: a push takes longer than that to name its blobs."""
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


class Duration(click.ParamType[timedelta, Any]):
    """`90s`, `30m`, `24h`, `7d`, or plain seconds."""

    name = "duration"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> timedelta:
        if isinstance(value, timedelta):
            return value
        match = _DURATION.match(str(value))
        if match is None:
            self.fail(f"{value!r} is not a duration like 90s, 30m, 24h or 7d", param, ctx)
        return timedelta(seconds=float(match.group(1)) * _UNIT_SECONDS[match.group(2)])


def _services() -> Services:
    from peftreg.registry.app import build_services
    from peftreg.registry.settings import Settings

    return build_services(Settings())


def _first_line(exc: BaseException) -> str:
    cause = getattr(exc, "orig", None) or exc  # a DBAPI error, without SQLAlchemy's SQL echo
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    return lines[0] if lines else type(cause).__name__


@contextmanager
def _reported(command: str) -> Iterator[None]:
    """Turn settings, database and blob store failures into one line and exit 1."""
    from pydantic import ValidationError
    from sqlalchemy.exc import SQLAlchemyError

    from peftreg.registry.storage.errors import StorageError

    try:
        yield
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise fail(f"{command}: invalid setting {where}: {first['msg']}") from None
    except (SQLAlchemyError, StorageError, OSError) as exc:
        raise fail(f"{command} failed: {_first_line(exc)}") from None


def _human(duration: timedelta) -> str:
    seconds = duration.total_seconds()
    return f"{seconds / 60:g} minutes" if seconds >= 60 else f"{seconds:g} seconds"


@click.command()
@click.option("--dry-run", is_flag=True, help="Report what would be removed; remove nothing.")
@click.option(
    "--grace",
    type=Duration(),
    default=None,
    help="Spare blobs used this recently (default PEFTREG_GC_GRACE_SECONDS, 24h).",
)
@click.option(
    "--force",
    is_flag=True,
    help=f"Allow a --grace shorter than {int(MIN_GRACE.total_seconds() // 60)} minutes.",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def gc(dry_run: bool, grace: timedelta | None, force: bool, as_json: bool) -> None:
    """Remove blobs no manifest references, and expired upload sessions."""
    if grace is not None and grace < MIN_GRACE and not force:
        raise click.BadParameter(
            f"{_human(grace)} is shorter than {_human(MIN_GRACE)}: pushes in progress could "
            "lose blobs they already uploaded; pass --force if that is really what you want",
            param_hint="'--grace'",
        )
    from peftreg.registry.maintenance.gc import collect_garbage

    with _reported("gc"):
        services = _services()
        if grace is None:
            grace = timedelta(seconds=services.settings.gc_grace_seconds)
        report = collect_garbage(services, dry_run=dry_run, grace=grace)
    if as_json:
        echo_json(report.as_dict())
        return
    verb = "would remove" if dry_run else "removed"
    click.echo(
        f"gc: {verb} {report.blobs_removed} blob(s) and {report.orphans_removed} orphaned "
        f"object(s), {human_size(report.bytes_reclaimed)} ({report.bytes_reclaimed} bytes); "
        f"{report.repository_links_removed} repository link(s); "
        f"{report.uploads_removed} expired upload session(s)"
    )


@click.command()
@click.option(
    "--verify-digests/--no-verify-digests",
    default=True,
    show_default=True,
    help="Re-hash every blob (reads all bytes); without, only sizes are checked.",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def fsck(verify_digests: bool, as_json: bool) -> None:
    """Check every blob's bytes and every manifest's references; exit 1 on errors."""
    from peftreg.registry.maintenance.fsck import check_store

    with _reported("fsck"):
        report = check_store(_services(), verify_digests=verify_digests)
    if as_json:
        echo_json(report.as_dict())
    else:
        for problem in report.problems:
            click.echo(problem.describe())
        click.echo(
            f"fsck: {report.blobs_checked} blob(s) ({human_size(report.bytes_checked)} hashed), "
            f"{report.manifests_checked} manifest(s), {len(report.errors)} error(s), "
            f"{len(report.orphans)} orphaned object(s)",
            err=True,
        )
    if report.errors:
        raise fail(f"{len(report.errors)} problem(s) found", EXIT_ERROR)
