"""Entry point of the `peftreg` command."""

from __future__ import annotations

import click

from client.cli.auth import login, logout
from client.cli.base import base
from client.cli.cache import cache
from client.cli.catalog import diff, history, list_repositories, rm, show
from client.cli.common import PeftregGroup
from client.cli.fingerprint import fingerprint
from client.cli.jobs import export, jobs
from client.cli.maintenance import fsck, gc
from client.cli.merge import merge
from client.cli.nola import nola
from client.cli.server import db, serve
from client.cli.tokens import token
from client.cli.transfer import pull, push, tag
from client.cli.worker import worker


@click.group(cls=PeftregGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="peftreg")
def cli() -> None:
    """peftreg: a registry for parameter-efficient fine-tuning adapters."""


cli.add_command(serve)
cli.add_command(db)
cli.add_command(worker)
cli.add_command(gc)
cli.add_command(fsck)
for command in (
    login,
    logout,
    push,
    pull,
    list_repositories,
    show,
    diff,
    base,
    tag,
    history,
    rm,
    token,
    cache,
    fingerprint,
    nola,
    export,
    jobs,
    merge,
):
    cli.add_command(command)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
