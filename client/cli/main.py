"""Entry point of the `peftreg` command."""

from __future__ import annotations

import click

from client.cli.server import db, serve


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="peftreg")
def cli() -> None:
    """peftreg: a registry for parameter-efficient fine-tuning adapters."""


cli.add_command(serve)
cli.add_command(db)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
